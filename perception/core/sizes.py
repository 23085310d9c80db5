"""Image sizes: always height x width (``HxW``, e.g. ``360x480``), like NumPy shapes and the model card.
One parser for every flag and YAML key that takes a size, with errors that name the option."""

from __future__ import annotations

__all__ = ["parse_hw"]


def parse_hw(
    value: str | tuple[int, int] | list[int] | None,
    *,
    option: str,
    minimum: int = 1,
    none_words: tuple[str, ...] = (),
    keep_words: tuple[str, ...] = (),
) -> tuple[int, int] | str | None:
    """``"360x480"`` (or a 2-sequence) -> ``(360, 480)``.

    ``none_words`` (e.g. ``("none", "full")``) map to None, ``keep_words`` (e.g. ``("dynamic",)``) are
    returned as they are; both sides must be integers >= ``minimum``. Errors name ``option``.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in none_words or (not text and none_words):
            return None
        if text in keep_words:
            return text
        parts = text.split("x")
    else:
        parts = list(value)
    words = "".join(f" or '{w}'" for w in none_words + keep_words)
    try:
        if len(parts) != 2:
            raise ValueError
        h, w = (int(v) for v in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{option} must be HxW (height x width, e.g. 360x480){words}, got {value!r}") from None
    if h < minimum or w < minimum:
        raise ValueError(f"{option} {h}x{w} is too small: both sides must be at least {minimum}")
    return h, w
