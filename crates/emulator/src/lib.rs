//! The software x86-64 engine.
