//! Kiln end-to-end suites
