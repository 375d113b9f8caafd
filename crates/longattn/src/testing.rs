//! Shared test support: the awkward sizes, seeded inputs, tolerances.
