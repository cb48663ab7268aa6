"""Planning each client's settings: device profiles, the settings they give each client
(rank, alpha, quantization, batch), and the simulated faults of a seeded run."""
