/*
 * As shipped in host_patches/ (docs/atomic-inc-protocol.md), kvm.atomic_inc_mode=local_first: the first
 * contract (contract_v1_local_first.pml) plus its install rule: when an Ivy fault installs the jiffies
 * page on a node, the node keeps max(its own jiffies, the received one).
 */
#define INSTALL_MAX
#include "contract_v1_local_first.pml"
