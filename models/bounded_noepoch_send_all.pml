/*
 * Bounded waits without the epoch check, kvm.atomic_inc_mode=send_all: after a failed round the
 * sender still sends a fence to every node and waits for the answers, but a node does not refuse
 * older UPDATEs. Messages of one connection arrive in order, yet its dsm-conn threads handle them
 * in any order, so an UPDATE of the failed round can be applied after its node answered the
 * fence, while the guest already counts ticks itself. no_late_update must fail here.
 */
#define BOUNDED
#include "bounded.pml"
