//! Tessera datapath: packet parsing and rewriting, per-flow handshake state, and the shell over
//! NFQUEUE, network namespaces and iptables. Arrives with the datapath issue.
