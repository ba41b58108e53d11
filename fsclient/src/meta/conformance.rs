//! The conformance suite every metadata engine passes.
