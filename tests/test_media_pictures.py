"""Pictures of samples: the completion grid (wrapped in rows) and the audio waveform + spectrogram."""

from __future__ import annotations

import numpy as np
import pytest

from media.pictures import LINE_COLOR, PENDING, PROMPT_WAVE, SAMPLED_WAVE, audio_picture, make_grid, masked_prompt


def test_grid_wraps_tiles_into_rows_with_the_prompt_line_in_each():
    tiles = [np.full((64, 64, 3), i * 40, np.uint8) for i in range(5)]
    grid = make_grid(tiles, 10, scale=2, columns=3)
    assert grid.shape == (2 * 128 + 4, 3 * 128 + 2 * 4, 3)
    assert (grid[132 + 64:, 132 * 2:] == 255).all()  # no sixth tile: background
    assert np.array_equal(grid[132 + 64, 132:132 + 128], np.full((128, 3), 160))  # tile 4, second row
    for top in (0, 132):
        assert (grid[top + 10 * 2 - 1] == LINE_COLOR).all()
    with pytest.raises(ValueError, match="at least one tile"):
        make_grid([], 0)


def test_masked_prompt_keeps_the_rows_and_blacks_out_the_rest():
    image = np.full((64, 64, 3), 200, np.uint8)
    prompt = masked_prompt(image, 20)
    assert (prompt[:20] == 200).all() and not prompt[20:].any() and (image == 200).all()


def test_audio_picture_tells_prompt_continuation_and_pending_apart():
    t = np.arange(3000) / 12000
    x = 0.5 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    pic = audio_picture(x, prompt_len=1000, total_len=6000, width=600, wave_height=100, spectrum_height=50)
    assert pic.shape == (100 + 50 + 24, 616, 3) and pic.dtype == np.uint8
    wave = pic[8:108, 8:608]

    def colours(cols: slice) -> set[tuple]:
        return {tuple(c) for c in wave[:, cols].reshape(-1, 3)}

    assert tuple(PROMPT_WAVE) in colours(slice(0, 90)) and tuple(SAMPLED_WAVE) not in colours(slice(0, 90))
    assert tuple(SAMPLED_WAVE) in colours(slice(110, 290)) and tuple(PROMPT_WAVE) not in colours(slice(110, 290))
    assert (wave[:, 100] == LINE_COLOR).all()  # where the prompt ends: 1000 / 6000 of the width
    assert (wave[:, 310:] == PENDING).all()  # not sampled yet
    spectrum = pic[116:166, 8:608]
    assert spectrum[:, 150].std() > 0 and (spectrum[:, 310:] == PENDING).all()
    assert audio_picture(np.zeros(0, np.float32)).shape[2] == 3  # nothing sampled yet: an empty picture
