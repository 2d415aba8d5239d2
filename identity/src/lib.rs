//! Tessera identity: workload claims, node keys and the signed handshake. (Arrives with the identity issue.)
