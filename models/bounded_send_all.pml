/*
 * As shipped in host_patches/ (docs/atomic-inc-protocol.md), kvm.atomic_inc_mode=send_all, with
 * its bounded waits: shipped_send_all.pml plus rounds that time out, the epoch fence and the
 * guest's fallback (bounded.pml).
 */
#define BOUNDED
#define EPOCH_CHECK
#include "bounded.pml"
