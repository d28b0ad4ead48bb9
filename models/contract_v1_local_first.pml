/*
 * The first contract, kvm.atomic_inc_mode=local_first, without the page-install rule that
 * docs/atomic-inc-protocol.md added after this model found the gap: on the vCPU
 * thread, under the page's dsm_lock, write max(copy, new) with __kvm_write_guest_page; then
 * UPDATE to the other nodes, each applying max under dsm_lock and acknowledging; the hypercall
 * returns after N - 1 acknowledgements. No Ivy state is touched.
 */
#include "dsm_state.pml"

inline hypercall(x, new, r) {
	atomic {
		await_dsm_lock(x);
		printf("ev: node %d vCPU: under dsm_lock writes max(%d, %d)\n", x, copy[x], new);
		copy[x] = MAX(copy[x], new);
		observe();
		send_round(new, r, x)
	}
	atomic { acks == N - 1 -> acks = 0; printf("ev: node %d vCPU: all %d acks in, hypercall returns 0\n", x, N - 1) }
}

inline apply_update(n, v) {
	printf("ev: node %d: dsm-conn applies max(%d, UPDATE(%d)) and acks\n", n, copy[n], v);
	copy[n] = MAX(copy[n], v);
	acks++;
	observe()
}

#include "dsm_procs.pml"
