"""SVG charts for the report page, written as strings: no plotting library, no script, nothing fetched.

Each function takes plain numbers (report.json values) and returns one <svg> element that reads without
JavaScript and prints as vectors. Every mark carries a <title>, so hovering names it. Colours are
colour-blind safe: viridis for a continuous quantity, Okabe–Ito for categories.
"""
from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Sequence

# viridis at ten evenly spaced points (dark purple → yellow); interpolated linearly in RGB between them
VIRIDIS = ("#440154", "#482878", "#3e4a89", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b",
           "#fde725")
OKABE_ITO = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
CONSTRAINT_COLOUR = "#c0392b"
HIGHLIGHT_COLOUR = "#d55e00"            # Okabe–Ito vermillion: the worst layers
BAR_COLOUR = "#0072b2"


def viridis(t: float) -> str:
    """The viridis colour at t ∈ [0, 1] (clamped)."""
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    a, b = (tuple(int(c[k:k + 2], 16) for k in (1, 3, 5)) for c in (VIRIDIS[i], VIRIDIS[i + 1]))
    return "#" + "".join(f"{round(x + (y - x) * (t - i)):02x}" for x, y in zip(a, b))


def number(value: float) -> str:
    """A tick label: three significant digits, no exponent for everyday magnitudes."""
    if value == 0:
        return "0"
    if 1e3 <= abs(value) < 1e7:
        return f"{value:,.0f}"
    if 1e-3 <= abs(value) < 1e3:
        return f"{value:.3g}"
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")


@dataclasses.dataclass(frozen=True)
class Axis:
    """Maps data values in [low, high] to pixels in [start, end]; logarithmic when the data span > 10×."""
    low: float
    high: float
    start: float
    end: float
    log: bool

    @classmethod
    def fit(cls, values: Sequence[float], start: float, end: float, *, from_zero: bool = True,
            decades: int = 6) -> Axis:
        """At most `decades` decades on a log axis: smaller values sit at its floor (a stub of a bar)."""
        low, high = min(values), max(values)
        if low > 0 and high / low > 10:
            top = math.ceil(math.log10(high))
            return cls(10 ** max(math.floor(math.log10(low)), top - decades), 10 ** top, start, end, True)
        if high <= low:
            high = low + (abs(low) or 1.0)
        low = 0.0 if from_zero and low >= 0 else low - 0.05 * (high - low)
        return cls(low, high + 0.08 * (high - low), start, end, False)

    def __call__(self, value: float) -> float:
        if self.log:
            value = max(value, self.low)
            fraction = math.log10(value / self.low) / math.log10(self.high / self.low)
        else:
            fraction = (value - self.low) / (self.high - self.low)
        return self.start + (self.end - self.start) * fraction

    def ticks(self) -> list[float]:
        if self.log:
            decades = range(round(math.log10(self.low)), round(math.log10(self.high)) + 1)
            steps = (1, 2, 5) if len(decades) <= 3 else (1,)
            return [m * 10 ** d for d in decades for m in steps if self.low <= m * 10 ** d <= self.high]
        raw = (self.high - self.low) / 5
        magnitude = 10 ** math.floor(math.log10(raw))
        step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
        first = math.ceil(self.low / step) * step
        return [first + i * step for i in range(int((self.high - first) / step) + 1)]


def _svg_open(width: int, height: int, label: str) -> str:
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{html.escape(label)}" font-size="11">')


def _axes(x: Axis | None, y: Axis, x_label: str, y_label: str, left: float, right: float) -> list[str]:
    """Frame, gridlines, tick labels and axis titles; without x, a frame from left to right."""
    top, bottom = y.end, y.start
    parts = []
    for tick in y.ticks():
        py = y(tick)
        parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" class="grid"/>'
                     f'<text x="{left - 5}" y="{py + 3.5:.1f}" text-anchor="end">{number(tick)}</text>')
    if x:
        for tick in x.ticks():
            px = x(tick)
            parts.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom}" class="grid"/>'
                         f'<text x="{px:.1f}" y="{bottom + 14}" text-anchor="middle">{number(tick)}</text>')
        parts.append(f'<text x="{(left + right) / 2:.0f}" y="{bottom + 32}" text-anchor="middle" class="title">'
                     f'{html.escape(x_label)}{" (log)" if x.log else ""}</text>')
    parts.append(f'<text x="14" y="{(top + bottom) / 2:.0f}" transform="rotate(-90 14 {(top + bottom) / 2:.0f})" '
                 f'text-anchor="middle" class="title">{html.escape(y_label)}{" (log)" if y.log else ""}</text>'
                 f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>'
                 f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" class="axis"/>')
    return parts


@dataclasses.dataclass(frozen=True)
class Point:
    label: str
    x: float
    y: float
    colour_value: float      # mapped through viridis over the points' range
    title: str               # hover text
    chosen: bool = False
    on_front: bool = False   # on the front the selection computed (size, p90 and quality)
    rejected: bool = False   # breaks a constraint


def size_latency_front(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both x and y (smaller and faster), by increasing x."""
    front: list[Point] = []
    for point in sorted(points, key=lambda p: (p.x, p.y)):
        if not front or point.y < front[-1].y:
            front.append(point)
    return front


def pareto_scatter(points: Sequence[Point], *, x_label: str, y_label: str, colour_label: str,
                   x_limit: float | None = None, y_limit: float | None = None) -> str:
    """x against y with a viridis colour per point, the x/y front as a step line, the chosen point a
    labelled diamond, constraint limits as dashed lines (a limit far beyond the data is named, not drawn,
    so it does not squash the points), and a colour legend."""
    width, height, left, right, top, bottom = 760, 376, 64, 600, 16, 310
    xs, ys = [p.x for p in points], [p.y for p in points]
    near_x = x_limit if x_limit and x_limit <= 2 * max(xs) else None
    near_y = y_limit if y_limit and y_limit <= 2 * max(ys) else None
    x = Axis.fit(xs + ([near_x] if near_x else []), left, right)
    y = Axis.fit(ys + ([near_y] if near_y else []), bottom, top)
    colours = [p.colour_value for p in points]
    low, high = min(colours), max(colours)

    def shade(value: float) -> str:
        return viridis((value - low) / (high - low) if high > low else 0.5)
    parts = [_svg_open(width, height, f"{y_label} against {x_label}, coloured by {colour_label}")]
    parts += _axes(x, y, x_label, y_label, left, right)
    if near_x:
        parts.append(f'<line x1="{x(near_x):.1f}" y1="{top}" x2="{x(near_x):.1f}" y2="{bottom}" class="limit">'
                     f'<title>limit: {number(near_x)}</title></line><text x="{x(near_x) + 3:.1f}" y="{top + 10}" '
                     f'class="limit-label">max</text>')
    if near_y:
        parts.append(f'<line x1="{left}" y1="{y(near_y):.1f}" x2="{right}" y2="{y(near_y):.1f}" class="limit">'
                     f'<title>limit: {number(near_y)}</title></line><text x="{right - 3}" y="{y(near_y) - 4:.1f}" '
                     f'text-anchor="end" class="limit-label">max</text>')
    far = ([f"max {number(x_limit)} far right"] if x_limit and not near_x else []) + (
        [f"max {number(y_limit)} far above"] if y_limit and not near_y else [])
    if far:
        parts.append(f'<text x="{left}" y="{bottom + 56}" class="limit-label">'
                     f'limits off the chart: {"; ".join(far)}</text>')
    front = size_latency_front(points)
    if len(front) > 1:
        path = f"M{x(front[0].x):.1f},{y(front[0].y):.1f}" + "".join(
            f"H{x(p.x):.1f}V{y(p.y):.1f}" for p in front[1:])
        parts.append(f'<path d="{path}" class="front"><title>size–latency front</title></path>')
    placed: list[tuple[float, float, float]] = []
    for p in sorted(points, key=lambda p: p.chosen):              # the chosen one drawn last, on top
        px, py, fill, title = x(p.x), y(p.y), shade(p.colour_value), html.escape(p.title)
        style = ' class="rejected"' if p.rejected else (' class="front-point"' if p.on_front else "")
        if p.chosen:
            parts.append(f'<path d="M{px:.1f},{py - 11:.1f}l11,11l-11,11l-11,-11z" fill="{fill}" class="chosen-mark">'
                         f'<title>{title}</title></path>')
        else:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="7" fill="{fill}"{style}><title>{title}</title>'
                         f'</circle>')
        text = p.label + (" — chosen" if p.chosen else "")
        lx, ly = _place_label(placed, px + 13, py - 7, 6.2 * len(text))
        parts.append(f'<text x="{lx:.1f}" y="{ly:.1f}" class="{"label chosen" if p.chosen else "label"}">'
                     f'{html.escape(text)}</text>')
    parts += _colour_legend(low, high, colour_label, right + 40, top + 10)
    parts.append("</svg>")
    return "".join(parts)


def _signed(value: float) -> str:
    return f"{0.0 if abs(value) < 0.005 else value:+.2f}"          # no "-0.00"


def _place_label(placed: list[tuple[float, float, float]], x: float, y: float,
                 width: float) -> tuple[float, float]:
    """The first of a few spots near (x, y) where a label `width` px wide overlaps no label placed so far."""
    for dy in (0, 14, -14, 28, -28, 42):
        if all(abs(y + dy - oy) >= 12 or x + width <= ox or ox + ow <= x for ox, oy, ow in placed):
            placed.append((x, y + dy, width))
            return x, y + dy
    placed.append((x, y, width))
    return x, y


def _colour_legend(low: float, high: float, label: str, left: float, top: float) -> list[str]:
    """Ten stacked swatches from high (top) to low, the ends labelled, and the marks' meaning."""
    parts = [f'<text x="{left}" y="{top}" class="title">{html.escape(label)}</text>']
    for i in range(10):
        t = 1 - i / 9
        parts.append(f'<rect x="{left}" y="{top + 8 + 14 * i}" width="16" height="14" fill="{viridis(t)}">'
                     f'<title>{_signed(low + t * (high - low))}</title></rect>')
    parts.append(f'<text x="{left + 22}" y="{top + 19}">{_signed(high)}</text>'
                 f'<text x="{left + 22}" y="{top + 8 + 14 * 10 - 3}">{_signed(low)}</text>')
    keys = [('<path d="M8,-7l7,7l-7,7l-7,-7z" class="chosen-mark" fill="#fff"/>', "chosen"),
            ('<circle cx="8" r="6" class="front-point" fill="#fff"/>', "on the front"),
            ('<circle cx="8" r="6" class="rejected" fill="#fff"/>', "breaks a limit"),
            ('<path d="M0,-4H8V4H16" class="front"/>', "size–p90 front"),
            ('<line x1="0" x2="16" class="limit"/>', "constraint")]
    for i, (mark, text) in enumerate(keys):
        at = top + 180 + 20 * i
        parts.append(f'<g transform="translate({left},{at})">{mark}<text x="22" y="4">{text}</text></g>')
    return parts


@dataclasses.dataclass(frozen=True)
class Bar:
    value: float
    title: str
    colour: str = BAR_COLOUR


def bar_chart(bars: Sequence[Bar], *, y_label: str, label: str, x_ticks: Sequence[tuple[int, str]] = (),
              reference: tuple[float, str] | None = None, from_zero: bool = True, width: int = 1100,
              height: int = 210) -> str:
    """One bar per value in order (layers left to right); x_ticks name some bar positions; reference
    draws a dashed horizontal line (an average) with its label. Log y when the values span > 10×."""
    left, right, top, bottom = 64, width - 12, 12, height - 36
    values = [b.value for b in bars] + ([reference[0]] if reference else [])
    y = Axis.fit(values, bottom, top, from_zero=from_zero, decades=4)
    x = Axis(0, len(bars), left, right, False)
    step = (right - left) / max(len(bars), 1)
    parts = [_svg_open(width, height, label)] + _axes(None, y, "", y_label, left, right)
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>')
    base = y(y.low)
    for i, bar in enumerate(bars):
        top_y = y(bar.value)
        parts.append(f'<rect x="{x(i) + step * 0.1:.1f}" y="{top_y:.1f}" width="{max(step * 0.8, 0.8):.1f}" '
                     f'height="{max(base - top_y, 0.5):.1f}" fill="{bar.colour}"><title>{html.escape(bar.title)}'
                     f'</title></rect>')
    for index, text in x_ticks:
        parts.append(f'<text x="{x(index) + step / 2:.1f}" y="{bottom + 14}" text-anchor="middle">'
                     f'{html.escape(text)}</text>')
    if reference:
        ry = y(reference[0])
        parts.append(f'<line x1="{left}" y1="{ry:.1f}" x2="{right}" y2="{ry:.1f}" class="reference"/>'
                     f'<text x="{right - 4}" y="{ry - 4:.1f}" text-anchor="end" class="title">'
                     f'{html.escape(reference[1])}</text>')
    parts.append("</svg>")
    return "".join(parts)


# threshold kinds (common.proto WeightHistogram.threshold_kind) whose cut is a band |w| < threshold
PRUNING_KINDS = ("magnitude", "largest pruned magnitude")


def weight_histogram(low: float, high: float, counts: Sequence[int], threshold: float, threshold_kind: str, *,
                     label: str) -> str:
    """Counts per equal bin over [low, high] on a log scale (tails stay visible), the cut at ±threshold:
    the pruned band |w| < threshold shaded, or for "clip" the clipped tails."""
    width, height, left, right, top, bottom = 300, 130, 40, 292, 8, 108
    peak = max(max(counts, default=0), 1)
    x = Axis(low, high if high > low else low + 1.0, left, right, False)
    step = (right - left) / max(len(counts), 1)
    parts = [_svg_open(width, height, label)]
    cut = threshold > 0 and threshold_kind in PRUNING_KINDS + ("clip",)
    if cut:
        a, b = x(max(-threshold, x.low)), x(min(threshold, x.high))
        if threshold_kind == "clip":
            parts.append(f'<rect x="{left}" y="{top}" width="{max(a - left, 0):.1f}" height="{bottom - top}" '
                         f'class="cut"/><rect x="{b:.1f}" y="{top}" width="{max(right - b, 0):.1f}" '
                         f'height="{bottom - top}" class="cut"/>')
        else:
            parts.append(f'<rect x="{a:.1f}" y="{top}" width="{max(b - a, 0):.1f}" height="{bottom - top}" '
                         'class="cut"/>')
    for i, count in enumerate(counts):
        if count:
            h = (bottom - top) * math.log10(1 + count) / math.log10(1 + peak)
            edge = low + (high - low) * i / len(counts)
            parts.append(f'<rect x="{left + i * step:.1f}" y="{bottom - h:.1f}" width="{max(step - 0.6, 0.6):.1f}" '
                         f'height="{h:.1f}" fill="{BAR_COLOUR}"><title>[{number(edge)}, '
                         f'{number(edge + (high - low) / len(counts))}): {count:,}</title></rect>')
    if cut:
        for edge in (-threshold, threshold):
            if x.low <= edge <= x.high:
                parts.append(f'<line x1="{x(edge):.1f}" y1="{top}" x2="{x(edge):.1f}" y2="{bottom}" class="limit">'
                             f'<title>{html.escape(threshold_kind)} {number(edge)}</title></line>')
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>'
                 f'<text x="{left}" y="{bottom + 14}" text-anchor="middle">{number(low)}</text>'
                 f'<text x="{right}" y="{bottom + 14}" text-anchor="middle">{number(high)}</text>'
                 f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{number(peak)}</text>'
                 f'<text x="{left - 4}" y="{bottom}" text-anchor="end">0</text>'
                 f'<text x="{(left + right) / 2}" y="{bottom + 20}" text-anchor="middle" class="title">weight'
                 f'</text></svg>')
    return "".join(parts)
