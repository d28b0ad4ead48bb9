/*
 * As shipped in host_patches/ (docs/atomic-inc-protocol.md), kvm.atomic_inc_mode=local_first,
 * with its bounded waits: shipped_local_first.pml plus rounds that time out, the epoch fence and
 * the guest's fallback (bounded.pml).
 */
#define BOUNDED
#define EPOCH_CHECK
#define LOCAL_FIRST
#include "bounded.pml"
