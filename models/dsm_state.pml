/*
 * Shared state of the ATOMIC_INC model: per-node copies of jiffies, the Ivy state of the page
 * that holds jiffies_64, the per-page dsm_lock, and the UPDATE messages in flight.
 * A variant file includes this, defines hypercall(x, new, r) and apply_update(n, v), then includes
 * dsm_procs.pml. Event lines start with "ev: " so the harness can turn a trail into a story.
 *
 * Compile-time bounds (spin -D...):
 *   N             nodes, 2..4 (generate_txid's array allows at most 4)
 *   TICKS         do_timer() calls, 1..MAXT, one tick each
 *   SERVERS       dsm-conn server threads per node (the kernel has 8; 2 already reorder)
 *   PAGE_TRAFFIC  0: the page is replicated everywhere and only UPDATEs write it
 *                 1: Ivy moves the page too: nodes start INITIAL, other vCPUs read jiffies
 *                    (read faults copy the owner's page), one vCPU writes a neighbouring
 *                    variable in the same page (write fault, invalidation via the copyset)
 * A variant that defines BOUNDED has rounds that may time out (bounded_*.pml): the round's
 * state below, and the timekeeper falls back to storing jiffies itself after a failed round.
 */
#ifndef N
#define N 2
#endif
#ifndef TICKS
#define TICKS 3
#endif
#ifndef SERVERS
#define SERVERS 2
#endif
#ifndef PAGE_TRAFFIC
#define PAGE_TRAFFIC 0
#endif
#define MAXT 4
#if N < 2 || N > 4
#error "N must be 2..4"
#endif
#if TICKS < 1 || TICKS > MAXT
#error "TICKS must be 1..MAXT"
#endif

/* Ivy page states (dsm-util.h); node 0 INITIAL counts as owner (dsm_is_initial && id == 0). */
mtype = { INITIAL, INVALID, SHARED, MODIFIED };

byte copy[N];              /* jiffies_64 in each node's host memory */
mtype state[N];            /* Ivy state of the jiffies page on each node */
byte owner;                /* the real owner; the prob-owner forwarding chain is abstracted away */
byte copyset;              /* the owner's copyset, bit i = node i (only the owner's is meaningful) */
bool locked[N];            /* per-page dsm_lock of the jiffies page */
bool fastpath_locked[N];   /* per-page fast_path_lock (taken by acquire's fast path, by INV) */
bool vcpu_has_mm[N];       /* the timekeeping vCPU thread of node i still has current->mm */
byte inbox[N * MAXT];      /* UPDATE value for node i from round r at [i*MAXT + r]; 0 = none */
byte acks;                 /* acknowledgements of the current round (synchronous variants) */
bool settled;              /* nothing can move any more (set once, by quiescence) */
/* BOUNDED variants: a failed round's fence and the guest's fallback. */
bool fence_box[N];         /* a fence waits in node i's receive queue */
bool fenced[N];            /* node i answered the fence (the sender: it raised its epoch) */
byte epoch[N];             /* node i's ATOMIC_INC epoch: 0, or 1 after a fence */
byte fence_acks;           /* fence answers the sender got */
bool fell_back;            /* the guest got an error and stores jiffies itself from now on */
bool late;                 /* ghost: an UPDATE changed a node's copy after that node was fenced */

/* Ghosts for the properties: what a guest read on each node returns, and derived facts. */
byte seen[N];
bool went_back;            /* some node's seen value decreased at some point */
byte hi;                   /* max over seen[] */
byte lo;                   /* min over seen[] */
hidden byte obs_i;
hidden byte obs_v;
hidden byte inv_i;
hidden byte send_i;

#define HAS_COPY(x)    (state[x] == SHARED || state[x] == MODIFIED)
/* A guest read on x returns x's own copy if x holds the page (or is node 0 before first use),
   otherwise what the fault installs. */
#define READS_LOCAL(x) (HAS_COPY(x) || (x == 0 && state[0] == INITIAL))
#define MAX(a, b)      ((a) > (b) -> (a) : (b))
/* What an Ivy fault on x installs as x's jiffies: the owner's, or with the contract's install rule
   (INSTALL_MAX) the larger of the owner's and x's own. */
#ifdef INSTALL_MAX
#define PAGE_IN(x)     MAX(copy[x], copy[owner])
#else
#define PAGE_IN(x)     copy[owner]
#endif

/* Recompute the ghosts; called after every change of copy[], state[] or owner. */
inline observe() {
	hi = 0; lo = 255; obs_i = 0;
	do
	:: obs_i < N ->
		if
		:: READS_LOCAL(obs_i) -> obs_v = copy[obs_i]
		:: else -> obs_v = PAGE_IN(obs_i)
		fi;
		if
		:: obs_v < seen[obs_i] -> went_back = true
		:: else
		fi;
		seen[obs_i] = obs_v;
		if
		:: obs_v > hi -> hi = obs_v
		:: else
		fi;
		if
		:: obs_v < lo -> lo = obs_v
		:: else
		fi;
		obs_i++
	:: else -> break
	od;
	obs_i = 0; obs_v = 0
}

/* Wait for node n's dsm_lock, saying so in the trail when it is held. */
inline await_dsm_lock(n) {
	if
	:: locked[n] -> printf("ev: waits for node %d's dsm_lock (held)\n", n)
	:: else
	fi;
	!locked[n]
}

/* INV to every holder in set except x (kvm_dsm_invalidate). The INV handler takes no dsm_lock,
   only the holder's fast_path_lock. */
inline invalidate(set, x) {
	inv_i = 0;
	do
	:: inv_i < N ->
		if
		:: inv_i != x && (set & (1 << inv_i)) ->
			if
			:: fastpath_locked[inv_i] ->
				printf("ev: node %d: INV handler waits for the page's fast_path_lock (held)\n", inv_i)
			:: else
			fi;
			!fastpath_locked[inv_i];
			state[inv_i] = INVALID;
			printf("ev: node %d: INV from node %d, page now INVALID\n", inv_i, x)
		:: else
		fi;
		inv_i++
	:: else -> break
	od;
	inv_i = 0
}

/* Ivy read fault of the page on node x (ivy_kvm_dsm_page_fault, read). The caller holds
   x's dsm_lock; the owner's dsm-conn thread serves the READ under the owner's dsm_lock.
   The whole page travels, jiffies included. */
inline ivy_read_fault(x) {
	if
	:: HAS_COPY(x)
	:: x == 0 && state[0] == INITIAL ->
		state[0] = SHARED; copyset = 1;
		printf("ev: node 0: first read of the page, node 0 is owner (SHARED)\n")
	:: else ->
		printf("ev: node %d: read fault on the jiffies page, READ to owner node %d\n", x, owner);
		await_dsm_lock(owner);
		if
		:: owner == 0 && state[0] == INITIAL ->
			state[0] = SHARED; copyset = 1
		:: else ->
			if
			:: !(copyset & (1 << owner)) ->
				/* dsm_handle_read_req: BUG_ON(!test_bit(dsm_id, &resp.inv_copyset)). The
				   dsm-conn thread dies holding the owner's dsm_lock; the requester waits. */
				locked[owner] = true;
				printf("ev: node %d: BUG_ON in dsm_handle_read_req, the owner's copyset lacks the owner (cleared); the dsm-conn thread dies holding dsm_lock\n", owner);
				false
			:: else
			fi;
			state[owner] = SHARED
		fi;
		printf("ev: node %d: page copied in from node %d (jiffies %d -> %d), node %d is owner now\n",
			x, owner, copy[x], PAGE_IN(x), x);
		copyset = copyset | (1 << x);
		copy[x] = PAGE_IN(x);
		owner = x;
		state[x] = SHARED;
		observe()
	fi
}

/* Node x takes the page for writing (ivy_kvm_dsm_page_fault, write): it becomes the owner
   (MODIFIED) and every other copy is invalidated. The caller holds x's dsm_lock. */
inline ivy_own_for_write(x) {
	if
	:: state[x] == MODIFIED
	:: x == 0 && state[0] == INITIAL ->
		state[0] = MODIFIED; copyset = 1
	:: x == owner && state[x] == SHARED ->
		invalidate(copyset, x);
		state[x] = MODIFIED; copyset = 1 << x
	:: else ->
		printf("ev: node %d: write fault on the jiffies page, WRITE to owner node %d\n", x, owner);
		await_dsm_lock(owner);
		if
		:: owner == 0 && state[0] == INITIAL -> copyset = 0
		:: else -> copyset = copyset & ~(1 << owner)
		fi;
		printf("ev: node %d: page copied in from node %d (jiffies %d -> %d)\n",
			x, owner, copy[x], PAGE_IN(x));
		copy[x] = PAGE_IN(x);
		state[owner] = INVALID;
		invalidate(copyset, x);
		owner = x; state[x] = MODIFIED; copyset = 1 << x
	fi
}

/* Ivy write fault of the page on node x for a variable next to jiffies. */
inline ivy_write_fault(x) {
	ivy_own_for_write(x);
	printf("ev: node %d: guest wrote a neighbour of jiffies, node %d is owner (MODIFIED)\n", x, x);
	observe()
}

/* Queue UPDATE(v) of round r for every node except except_node (N: none). */
inline send_round(v, r, except_node) {
	send_i = 0;
	do
	:: send_i < N ->
		if
		:: send_i != except_node ->
			inbox[send_i * MAXT + r] = v;
			printf("ev: UPDATE(%d) sent to node %d\n", v, send_i)
		:: else
		fi;
		send_i++
	:: else -> break
	od;
	send_i = 0
}
