/*
 * Original method 2, moharaka/Linux-DSM write_update_update_first (with the prototype fixed so
 * it builds): update_local() on the vCPU thread does a read kvm_dsm_acquire_page (dsm_lock,
 * plus fast_path_lock on the fast path), writes with kvm_write_guest_page_nonlocal, whose
 * unuse_mm() leaves current->mm NULL, so kvm_dsm_release_page bails out on
 * WARN_ON(kvm->mm != current->mm) and never unlocks. Then UPDATE goes to the other nodes,
 * fire-and-forget, applied there with set semantics and the copyset clear.
 */
#include "dsm_state.pml"

inline hypercall(x, new, r) {
	atomic {
		if
		:: !vcpu_has_mm[x] ->
			printf("ev: node %d vCPU: kvm_dsm_acquire_page: WARN_ON(kvm->mm != current->mm), -EINVAL ignored\n", x);
			printf("ev: node %d vCPU: update_local writes %d (was %d) without dsm_lock\n", x, new, copy[x]);
			copy[x] = new
		:: else ->
			await_dsm_lock(x); locked[x] = true;
			if
			:: HAS_COPY(x) -> fastpath_locked[x] = true
			:: else -> ivy_read_fault(x)
			fi;
			printf("ev: node %d vCPU: update_local writes %d (was %d); unuse_mm() leaves the vCPU thread with current->mm NULL\n", x, new, copy[x]);
			copy[x] = new;
			vcpu_has_mm[x] = false;
			printf("ev: node %d vCPU: kvm_dsm_release_page: WARN_ON(kvm->mm != current->mm), returns without dsm_unlock: dsm_lock of the jiffies page leaked\n", x)
		fi;
		observe();
		send_round(new, r, x)
	}
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
