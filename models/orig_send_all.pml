/*
 * Original method 1, moharaka/Linux-DSM write_update_send_all: the host computes old + ticks
 * from the guest's (possibly stale) local jiffies and sends UPDATE to every node, itself
 * included; kvm_dsm_fetch returns at once for UPDATE, so the hypercall waits for nobody.
 * Receivers overwrite the value (set, not max) and ivy_kvm_dsm_handle_req then clears the
 * page's copyset as after any non-INV request.
 */
#include "dsm_state.pml"

inline hypercall(x, new, r) {
	atomic { send_round(new, r, N) }
}

inline apply_update(n, v) {
	printf("ev: node %d: dsm-conn sets jiffies to UPDATE(%d) (was %d)\n", n, v, copy[n]);
	copy[n] = v;
	if
	:: n == owner && copyset != 0 ->
		printf("ev: node %d: dsm_clear_copyset after the UPDATE wipes the owner's copyset\n", n);
		copyset = 0
	:: else
	fi;
	observe()
}

#include "dsm_procs.pml"
