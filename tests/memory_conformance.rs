//! The binder conformance suite against the in-memory binder.

use std::sync::Arc;

use bindery::Binder;
use bindery_core::conformance::Suite;

bindery_core::conformance_tests!(Suite::new(|| async {
    Ok(Arc::new(bindery::MemoryBinder::new()) as Arc<dyn Binder>)
}));
