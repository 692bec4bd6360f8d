"""Real place names of central Chongqing with rough WGS84 positions, to name generated things.

Roads, bridges, buildings and septic tanks are named after the nearest of these places, so a
name says roughly where a thing is (石桥铺二路 is near 石桥铺). Positions are approximate
(a few hundred metres): they only pick a name, nothing is placed on them.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from data_samples.geodesy import to_local

CENTRAL_PLACES = (
    ("解放碑", 106.577, 29.557), ("朝天门", 106.585, 29.566), ("两路口", 106.548, 29.553),
    ("大坪", 106.520, 29.540), ("化龙桥", 106.525, 29.565), ("李子坝", 106.535, 29.560),
    ("菜园坝", 106.548, 29.545), ("观音桥", 106.531, 29.576), ("江北嘴", 106.578, 29.573),
    ("五里店", 106.565, 29.597), ("红旗河沟", 106.518, 29.597), ("大石坝", 106.500, 29.590),
    ("石马河", 106.495, 29.612), ("龙头寺", 106.545, 29.625), ("冉家坝", 106.512, 29.625),
    ("人和", 106.520, 29.655), ("礼嘉", 106.520, 29.690), ("照母山", 106.495, 29.650),
    ("大竹林", 106.475, 29.655), ("悦来", 106.445, 29.700), ("两路", 106.630, 29.720),
    ("空港", 106.640, 29.745), ("回兴", 106.615, 29.700), ("鸳鸯", 106.545, 29.660),
    ("寸滩", 106.610, 29.600), ("唐家沱", 106.640, 29.610), ("郭家沱", 106.705, 29.600),
    ("弹子石", 106.595, 29.565), ("南坪", 106.565, 29.530), ("海棠溪", 106.580, 29.540),
    ("四公里", 106.570, 29.515), ("六公里", 106.555, 29.495), ("铜元局", 106.560, 29.545),
    ("黄桷垭", 106.615, 29.540), ("南山", 106.625, 29.555), ("茶园", 106.680, 29.510),
    ("李家沱", 106.535, 29.470), ("鱼洞", 106.520, 29.385), ("界石", 106.635, 29.415),
    ("南泉", 106.610, 29.440), ("杨家坪", 106.515, 29.510), ("谢家湾", 106.510, 29.525),
    ("黄桷坪", 106.520, 29.495), ("石桥铺", 106.480, 29.535), ("二郎", 106.455, 29.515),
    ("石坪桥", 106.495, 29.510), ("大渡口", 106.485, 29.485), ("跳磴", 106.450, 29.430),
    ("建胜", 106.470, 29.455), ("华岩", 106.440, 29.480), ("白市驿", 106.355, 29.490),
    ("陶家", 106.400, 29.420), ("沙坪坝", 106.455, 29.555), ("小龙坎", 106.465, 29.560),
    ("磁器口", 106.450, 29.580), ("双碑", 106.445, 29.605), ("井口", 106.445, 29.640),
    ("歌乐山", 106.425, 29.560), ("陈家桥", 106.320, 29.620), ("大学城", 106.310, 29.605),
    ("西永", 106.310, 29.580), ("土主", 106.330, 29.660), ("北碚", 106.400, 29.810),
    ("蔡家", 106.470, 29.740), ("歇马", 106.405, 29.765), ("水土", 106.500, 29.770),
    ("鱼嘴", 106.780, 29.650), ("龙兴", 106.825, 29.730), ("花溪", 106.580, 29.430),
    ("龙洲湾", 106.530, 29.400), ("木洞", 106.840, 29.570), ("鹿角", 106.600, 29.470),
    ("长生桥", 106.660, 29.450), ("玉峰山", 106.720, 29.680), ("统景", 106.880, 29.820),
    ("古路", 106.800, 29.860), ("西彭", 106.315, 29.355), ("含谷", 106.330, 29.530),
)

# Stems for arterial roads, after the real ones (渝澳大道, 金开大道, 星光大道 ...).
ARTERIAL_STEMS = (
    "渝澳", "金开", "星光", "金渝", "黄山", "经纬", "松石", "红锦", "兰桂", "同茂", "洪湖",
    "兴光", "金山", "嘉陵", "长江", "滨江", "南滨", "北滨", "建新", "民生", "民族", "人民",
    "中山", "新华", "解放", "和平", "胜利", "团结", "渝州", "科园", "石杨", "九龙", "巴山",
    "龙华", "腾龙", "青龙", "金童", "海峡", "江南", "内环", "朝天", "双山", "天星", "凤天",
)

CHINESE_DIGITS = "零一二三四五六七八九十"


def chinese_number(n: int) -> str:
    """1..99 as Chinese numerals (十二, 二十一)."""
    if n <= 10:
        return CHINESE_DIGITS[n]
    tens, ones = divmod(n, 10)
    head = "" if tens == 1 else CHINESE_DIGITS[tens]
    return head + "十" + (CHINESE_DIGITS[ones] if ones else "")


class Gazetteer:
    """Nearest-place look-ups over CENTRAL_PLACES."""

    def __init__(self) -> None:
        self.names = np.array([name for name, _, _ in CENTRAL_PLACES])
        lon = np.array([lon for _, lon, _ in CENTRAL_PLACES])
        lat = np.array([lat for _, _, lat in CENTRAL_PLACES])
        self._tree = cKDTree(np.column_stack(to_local(lon, lat)))

    def nearest(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Name of the nearest place to each local (x, y) in metres."""
        _, index = self._tree.query(np.column_stack([np.ravel(x), np.ravel(y)]))
        return self.names[index]


def numbered_names(stems: list[str], variants: tuple[str, ...], fallback: str) -> list[str]:
    """One name per stem, distinct: 石桥铺路, 石桥铺一路 ... then 石桥铺7号路.

    The k-th use of a stem takes the k-th variant; past the variants, ``fallback`` is
    formatted with the number (``"{n}号路"``).
    """
    seen: dict[str, int] = {}
    names = []
    for stem in stems:
        k = seen.get(stem, 0)
        seen[stem] = k + 1
        suffix = variants[k] if k < len(variants) else fallback.format(n=k + 1)
        names.append(stem + suffix)
    return names
