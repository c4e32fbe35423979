//! Harness for cross-binary tests: builds and caches the Debian trixie root filesystem with
//! CRIU and the test apps, and starts "nodes" (root copies run by `node-sandbox`).
