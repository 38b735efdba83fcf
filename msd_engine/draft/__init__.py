"""The MSD / EAGLE draft head: config, strict weights, and its one-layer model."""
