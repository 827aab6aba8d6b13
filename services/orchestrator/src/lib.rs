//! autopipe orchestrator
