"""TiffSink: pages written one by one, OME-XML at close, compact per-page bookkeeping."""

import numpy as np
import tifffile

from fm2s_stream.frame import Frame, Result
from fm2s_stream.tiffsink import TiffSink


def test_pages_of_two_channels_read_back_with_their_ome_axes_and_the_bookkeeping_stays_compact(tmp_path):
    sink = TiffSink(tmp_path, "denoised", roll_every=500)
    sink.open()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 4000, (16, 16), dtype=np.uint16) for _ in range(8)]
    for i in range(600):  # 600 pages: one roll at 500
        frame = Frame(frames[i % 8], channel=("DAPI", "GFP")[i % 2], t=i // 2, frame_id=i, ts=1000.0 + 0.05 * i)
        sink.write(Result(frame, frame.pixels, "denoised", False, 0, 1.0, None, 1.0))
        if i == 499:
            planes = sink._file.planes  # what a long file holds in memory per page
            assert len(planes) == 500 and planes.channels == ["DAPI", "GFP"]
            assert planes.ts.itemsize + planes.channel_of.itemsize <= 12  # 12 bytes a page, not a header dict
    sink.close()
    assert [p.name for p in sink.finalised] == ["fm2s_denoised_000.ome.tif", "fm2s_denoised_001.ome.tif"]
    with tifffile.TiffFile(sink.finalised[0]) as tif:
        assert tif.is_ome and tif.series[0].shape == (250, 2, 16, 16)
        np.testing.assert_array_equal(tif.series[0].asarray()[3, 1], frames[7])  # page 7: t=3, GFP
        xml = tif.ome_metadata
    assert 'Name="DAPI"' in xml and 'Name="GFP"' in xml and 'DeltaT="0.050000"' in xml
