//! Lock helpers shared by every module that keeps state behind a std lock.
//!
//! The locks here are std locks, not tokio's: they are held for a few
//! statements, never across an `.await`, so an async lock would only add
//! cost. A lock is poisoned when a thread panicked while holding it; every
//! state guarded in this crate keeps its invariants between statements that
//! can panic, so the service keeps serving with it instead of panicking too.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `mutex`, recovering from poisoning (see the module docs).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-locks `lock`, recovering from poisoning (see the module docs).
pub(crate) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks `lock`, recovering from poisoning (see the module docs).
pub(crate) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}
