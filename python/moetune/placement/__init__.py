"""Placement of routed experts per step: CPU engine, GPU-resident or GPU-streamed (issue 15).

Modules (one concept each): plan.py (LayerPlan / Where, shared with the GPU path), cost.py (the
cost model), calibrate.py (start-up calibration, its cache, the online correction), scheduler.py
(counts -> LayerPlan), residency.py (which experts stay on the GPU, the GPU byte budget),
metrics.py (per-step numbers), trace.py (Chrome/Perfetto trace). Import the modules directly.
"""
