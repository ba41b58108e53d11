//! Baton's supervisor.
