//! End-to-end: boot the test guest with the real daxvisor binary on real KVM.
