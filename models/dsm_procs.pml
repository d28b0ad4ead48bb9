/*
 * Processes and properties of the ATOMIC_INC model; each variant file includes this last,
 * after defining hypercall(x, new, r) and apply_update(n, v).
 */

/* The timekeeping vCPU on node x reads jiffies_64: straight from EPT if x holds the page,
   otherwise through an EPT fault (kvm_dsm_vcpu_acquire_page), which needs current->mm. */
inline vcpu_read_jiffies(x, val) {
	if
	:: HAS_COPY(x)
	:: else ->
		if
		:: !vcpu_has_mm[x] ->
			printf("ev: node %d vCPU: EPT fault on the jiffies page with current->mm NULL: kvm_dsm_vcpu_acquire_page fails, the vCPU is stuck\n", x);
			false
		:: else
		fi;
		await_dsm_lock(x); locked[x] = true;
		ivy_read_fault(x);
		locked[x] = false
	fi;
	val = copy[x]
}

/* do_timer() under the guest's jiffies_lock: one process, so ticks are serialised; the vCPU
   holding the timekeeping duty may be on any node at each tick. */
proctype timekeeper() {
	byte round, x, old, new;
	do
	:: atomic {
		round < TICKS ->
		select(x : 0 .. N - 1);
		vcpu_read_jiffies(x, old);
		new = old + 1;    /* the host's a2 + a3 */
#ifdef BOUNDED
		if
		:: fell_back ->
			printf("ev: tick %d on node %d: do_timer reads jiffies=%d, ATOMIC_INC is off\n",
				round + 1, x, old)
		:: else ->
#endif
		printf("ev: tick %d on node %d: do_timer reads jiffies=%d, hypercall ATOMIC_INC(old=%d, ticks=1)\n",
			round + 1, x, old, old)
#ifdef BOUNDED
		fi
#endif
	   }
#ifdef BOUNDED
	   if
	   :: !fell_back -> hypercall(x, new, round)
	   :: else -> guest_store(x, new)
	   fi;
#else
	   hypercall(x, new, round);
#endif
	   atomic { round++; x = 0; old = 0; new = 0 }
	:: round == TICKS -> break
	od;
	printf("ev: last tick done\n")
}

/* A dsm-conn thread of node: receives any pending UPDATE (delivery order is arbitrary) and
   handles it under the page's dsm_lock (ivy_kvm_dsm_handle_req). Receive and apply are one step
   when the lock is free; a thread that finds the lock held keeps its message and waits. */
proctype server(byte node) {
	byte v;
end_idle:
	do
	:: atomic {
		if
		:: inbox[node * MAXT + 0] != 0 -> v = inbox[node * MAXT + 0]; inbox[node * MAXT + 0] = 0
		:: inbox[node * MAXT + 1] != 0 -> v = inbox[node * MAXT + 1]; inbox[node * MAXT + 1] = 0
		:: inbox[node * MAXT + 2] != 0 -> v = inbox[node * MAXT + 2]; inbox[node * MAXT + 2] = 0
		:: inbox[node * MAXT + 3] != 0 -> v = inbox[node * MAXT + 3]; inbox[node * MAXT + 3] = 0
		fi;
		printf("ev: node %d: a dsm-conn thread receives UPDATE(%d)\n", node, v);
		await_dsm_lock(node);
		apply_update(node, v);
		v = 0
	   }
#ifdef BOUNDED
	:: atomic { fence_box[node] -> fence_box[node] = false; apply_fence(node) }
#endif
	od
}

#if PAGE_TRAFFIC
/* Other vCPUs reading jiffies: whenever a node lacks the page, one of its vCPUs may fault it in. */
proctype guest_reader() {
	byte x;
end_idle:
	do
	:: atomic {
		if
		:: !HAS_COPY(0) -> x = 0
		:: !HAS_COPY(1) -> x = 1
#if N > 2
		:: !HAS_COPY(2) -> x = 2
#endif
#if N > 3
		:: !HAS_COPY(3) -> x = 3
#endif
		fi;
		await_dsm_lock(x); locked[x] = true;
		ivy_read_fault(x);
		locked[x] = false; x = 0
	   }
	od
}

/* One guest write to a variable sharing the 4 KB page with jiffies_64, from any node. */
proctype neighbour_writer() {
	byte x;
	select(x : 0 .. N - 1);
	atomic { await_dsm_lock(x); locked[x] = true; ivy_write_fault(x); locked[x] = false }
}
#endif

/* Fires once nothing else can move: the end of the run, normal or stuck. */
proctype quiescence() {
	byte i;
	timeout ->
	atomic {
		settled = true;
		printf("ev: nothing can move any more:");
		do
		:: i < N ->
			printf(" node %d sees %d", i, seen[i]);
			if
			:: locked[i] -> printf(" (dsm_lock held)")
			:: else
			fi;
			i++
		:: else -> break
		od;
		printf("\n")
	}
}

init {
	byte i, k;
	atomic {
		do
		:: i < N ->
#if PAGE_TRAFFIC
			state[i] = INITIAL;
#else
			state[i] = SHARED;
#endif
			vcpu_has_mm[i] = true;
			k = 0;
			do
			:: k < SERVERS -> run server(i); k++
			:: else -> break
			od;
			i++
		:: else -> break
		od;
#if !PAGE_TRAFFIC
		copyset = (1 << N) - 1;
#endif
		observe();
		run timekeeper();
#if PAGE_TRAFFIC
		run guest_reader();
		run neighbour_writer();
#endif
		run quiescence();
		i = 0; k = 0
	}
}

/* 1. A guest read on any node never returns less than an earlier read there. */
ltl monotonic { [] !went_back }
/* 2. When the run is over, every node reads the number of ticks. */
ltl converge { [] (settled -> (lo == TICKS && hi == TICKS)) }
/* 3. Two nodes never read values more than one tick apart. */
ltl skew { [] (hi <= lo + 1) }
/* 4. No deadlock: a separate build with -DNOCLAIM reports invalid end states. */
/* 5. No UPDATE changes a node's copy after that node answered a failed round's fence (for the
      sender: after it raised its own epoch). Only BOUNDED variants have fences. */
ltl no_late_update { [] !late }
