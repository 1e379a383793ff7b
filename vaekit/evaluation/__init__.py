"""Measuring a trained model: NELBO, importance-weighted NLL, bits/dim, active units."""
