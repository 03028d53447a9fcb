"""The one table of test tolerances (relative errors against optden.reference, float64)."""

# Precision contract (DESIGN.md section 5), default mode.
DENOISE_RTOL = 1e-5
LOG_DENSITY_RTOL = 1e-6
# Quantities computed with float64 arithmetic throughout (reference-vs-reference checks).
FLOAT64_RTOL = 1e-10
# The sigma range the contract covers.
SIGMAS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1e3)
