"""Side-by-side benchmarks of eventfn against peer frameworks and raw client loops."""
