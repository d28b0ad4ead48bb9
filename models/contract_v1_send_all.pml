/*
 * The first contract, kvm.atomic_inc_mode=send_all, without the page-install rule that
 * docs/atomic-inc-protocol.md added after this model found the gap: UPDATE(old +
 * ticks) to every node, itself included; each applies max(copy, new) under dsm_lock without
 * touching Ivy state and acknowledges; the hypercall returns after all N acknowledgements.
 */
#include "dsm_state.pml"

inline hypercall(x, new, r) {
	atomic { send_round(new, r, N) }
	atomic { acks == N -> acks = 0; printf("ev: node %d vCPU: all %d acks in, hypercall returns 0\n", x, N) }
}

inline apply_update(n, v) {
	printf("ev: node %d: dsm-conn applies max(%d, UPDATE(%d)) and acks\n", n, copy[n], v);
	copy[n] = MAX(copy[n], v);
	acks++;
	observe()
}

#include "dsm_procs.pml"
