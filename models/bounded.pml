/*
 * Rounds with bounded waits (host_patches/giantvm-master 0010-0011, docs/atomic-inc-protocol.md),
 * shared by the bounded_*.pml variants. On top of the shipped protocol (max under dsm_lock,
 * synchronous answers, the page-install rule):
 * - a round may time out whenever some answer is not in yet (a slow or cut node);
 * - the sender then raises its own epoch, sends a fence to every other node and waits for their
 *   answers, again at most until a timeout; then the hypercall fails and the guest stores
 *   old + ticks itself (a write through Ivy) and never calls again;
 * - with EPOCH_CHECK a node refuses UPDATEs of an older epoch, in the same step as the store,
 *   and a fence raises its epoch; without it (bounded_noepoch_*) the fence is only a barrier
 *   message that every node answers.
 * Define LOCAL_FIRST for kvm.atomic_inc_mode=local_first.
 */
#define INSTALL_MAX
#include "dsm_state.pml"

#ifdef LOCAL_FIRST
#define ANSWERS (N - 1)
#else
#define ANSWERS N
#endif

hidden byte fence_i;

/* After a failed round, the guest stores jiffies itself: a write through Ivy on node x. */
inline guest_store(x, v) {
	atomic {
		await_dsm_lock(x); locked[x] = true;
		ivy_own_for_write(x);
		locked[x] = false;
		printf("ev: node %d: the guest stores jiffies = %d itself\n", x, v);
		copy[x] = v;
		observe()
	}
}

/* The sender after a round timed out: epoch, fences, their answers or a timeout, the error. */
inline fence_and_fall_back(x, new) {
	atomic {
		printf("ev: node %d vCPU: the round times out with %d of %d answers\n", x, acks, ANSWERS);
		acks = 0;
#ifdef EPOCH_CHECK
		epoch[x] = 1;
#endif
		fenced[x] = true;
		fence_i = 0;
		do
		:: fence_i < N ->
			if
			:: fence_i != x -> fence_box[fence_i] = true
			:: else
			fi;
			fence_i++
		:: else -> break
		od;
		fence_i = 0;
		printf("ev: node %d vCPU: fence sent to every other node\n", x)
	}
	if
	:: atomic { fence_acks == N - 1 -> printf("ev: node %d vCPU: every fence answered\n", x) }
	:: atomic { fence_acks < N - 1 ->
		printf("ev: node %d vCPU: the fence times out with %d of %d answers\n", x, fence_acks, N - 1) }
	fi;
	atomic {
		fell_back = true;
		printf("ev: node %d vCPU: the hypercall fails, the guest turns ATOMIC_INC off\n", x)
	}
	guest_store(x, new)
}

inline hypercall(x, new, r) {
#ifdef LOCAL_FIRST
	atomic {
		await_dsm_lock(x);
		printf("ev: node %d vCPU: under dsm_lock writes max(%d, %d)\n", x, copy[x], new);
		copy[x] = MAX(copy[x], new);
		observe();
		send_round(new, r, x)
	}
#else
	atomic { send_round(new, r, N) }
#endif
	if
	:: atomic { acks == ANSWERS -> acks = 0;
		printf("ev: node %d vCPU: all %d answers in, hypercall returns 0\n", x, ANSWERS) }
	:: acks < ANSWERS -> fence_and_fall_back(x, new)
	fi
}

/* An UPDATE on node n's dsm-conn thread; `late` marks one that changes a fenced node's copy. */
inline apply_update(n, v) {
#ifdef EPOCH_CHECK
	if
	:: epoch[n] > 0 ->
		printf("ev: node %d: dsm-conn refuses UPDATE(%d) of an older epoch and answers\n", n, v)
	:: else ->
#else
	if
	:: true ->
#endif
		printf("ev: node %d: dsm-conn applies max(%d, UPDATE(%d)) and answers\n", n, copy[n], v);
		if
		:: v > copy[n] && fenced[n] ->
			late = true;
			printf("ev: node %d: UPDATE(%d) changed the copy after node %d answered the fence\n", n, v, n)
		:: else
		fi;
		copy[n] = MAX(copy[n], v);
		observe()
	fi;
	acks++
}

/* A fence on node n's dsm-conn thread (no dsm_lock: it names no page). */
inline apply_fence(n) {
#ifdef EPOCH_CHECK
	epoch[n] = 1;
#endif
	fenced[n] = true;
	fence_acks++;
	printf("ev: node %d: dsm-conn answers the fence\n", n)
}

#include "dsm_procs.pml"
