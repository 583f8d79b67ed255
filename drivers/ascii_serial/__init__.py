"""ASCII serial driver: RS-232/485 instruments that speak lines of text.

Gauges, scales, temperature controllers and ADAM-4000-style modules. ``config`` and the pure
``framing``/``parse`` modules import no serial library; only ``transport`` does.
"""
