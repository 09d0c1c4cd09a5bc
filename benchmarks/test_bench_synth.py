"""SynthCXR generation speed: one 256 px image with its findings rendered (the demo makes 1200 of them).
The speed is measured here, not asserted in the unit tests."""
from gkcore.data import synth


def test_synth_render_256(benchmark):
    synth.render(256, [0, 0, 0], [0, 0, 2])  # warm-up (imports)
    img, rec = benchmark(synth.render, 256, [0, 3, 0], [0, 3, 2])
    assert img.shape == (256, 256) and rec
