"""Chinese place names with matching pinyin, for the generated streets, communities and grids.

Every name is built from (hanzi, pinyin) pieces so that ``name_zh`` and ``name_en`` always
say the same thing. Names are drawn without replacement within one parent, so siblings never
share a name.
"""

from __future__ import annotations

import numpy as np

# First syllables of generated place names.
_HEADS = (
    ("石", "shi"), ("龙", "long"), ("黄", "huang"), ("白", "bai"), ("青", "qing"), ("新", "xin"),
    ("大", "da"), ("小", "xiao"), ("金", "jin"), ("马", "ma"), ("双", "shuang"), ("高", "gao"),
    ("长", "chang"), ("平", "ping"), ("安", "an"), ("凤", "feng"), ("桃", "tao"), ("柏", "bai"),
    ("杨", "yang"), ("东", "dong"), ("南", "nan"), ("西", "xi"), ("北", "bei"), ("上", "shang"),
    ("下", "xia"), ("中", "zhong"), ("观", "guan"), ("太", "tai"), ("永", "yong"), ("兴", "xing"),
    ("清", "qing"), ("红", "hong"), ("花", "hua"), ("松", "song"), ("竹", "zhu"), ("梨", "li"),
    ("桂", "gui"), ("鹿", "lu"), ("鹤", "he"), ("虎", "hu"), ("宝", "bao"), ("铜", "tong"),
    ("铁", "tie"), ("玉", "yu"), ("三", "san"), ("五", "wu"), ("七", "qi"), ("九", "jiu"),
    ("万", "wan"), ("福", "fu"), ("丰", "feng"), ("乐", "le"), ("明", "ming"), ("天", "tian"),
    ("沙", "sha"), ("文", "wen"), ("仁", "ren"), ("古", "gu"), ("蔡", "cai"), ("柳", "liu"),
)

# Second syllables: the landform words that end most place names in the Sichuan basin.
_TAILS = (
    ("桥", "qiao"), ("溪", "xi"), ("坝", "ba"), ("湾", "wan"), ("坪", "ping"), ("山", "shan"),
    ("岭", "ling"), ("沟", "gou"), ("坡", "po"), ("河", "he"), ("口", "kou"), ("场", "chang"),
    ("井", "jing"), ("塘", "tang"), ("林", "lin"), ("垭", "ya"), ("岩", "yan"), ("池", "chi"),
    ("滩", "tan"), ("沱", "tuo"), ("门", "men"), ("堡", "bao"), ("寺", "si"), ("庙", "miao"),
    ("田", "tian"), ("坎", "kan"), ("槽", "cao"), ("峡", "xia"), ("嘴", "zui"), ("洞", "dong"),
    ("店", "dian"), ("园", "yuan"), ("泉", "quan"), ("江", "jiang"), ("峰", "feng"), ("台", "tai"),
    ("湖", "hu"),
)

# Surnames for the "X家Y" names (张家湾, 李家沱) so common around Chongqing.
_SURNAMES = (
    ("张", "zhang"), ("王", "wang"), ("李", "li"), ("刘", "liu"), ("陈", "chen"), ("杨", "yang"),
    ("黄", "huang"), ("周", "zhou"), ("吴", "wu"), ("徐", "xu"), ("孙", "sun"), ("朱", "zhu"),
    ("胡", "hu"), ("郭", "guo"), ("何", "he"), ("罗", "luo"), ("谢", "xie"), ("邓", "deng"),
    ("唐", "tang"), ("冉", "ran"), ("谭", "tan"), ("蒋", "jiang"), ("曾", "zeng"), ("龚", "gong"),
)

# Auspicious two-syllable words that name urban communities (和平社区, 幸福社区).
_COMMUNITY_WORDS = (
    ("和平", "he ping"), ("幸福", "xing fu"), ("光明", "guang ming"), ("团结", "tuan jie"),
    ("胜利", "sheng li"), ("民主", "min zhu"), ("建设", "jian she"), ("新华", "xin hua"),
    ("人民", "ren min"), ("友谊", "you yi"), ("朝阳", "chao yang"), ("文化", "wen hua"),
    ("花园", "hua yuan"), ("滨江", "bin jiang"), ("锦绣", "jin xiu"), ("阳光", "yang guang"),
    ("康宁", "kang ning"), ("嘉陵", "jia ling"), ("长江", "chang jiang"), ("桂花", "gui hua"),
    ("翠湖", "cui hu"), ("春晖", "chun hui"), ("枫叶", "feng ye"), ("学府", "xue fu"),
    ("民安", "min an"), ("和谐", "he xie"), ("复兴", "fu xing"), ("振兴", "zhen xing"),
    ("兴隆", "xing long"), ("鸿恩", "hong en"), ("书香", "shu xiang"), ("育才", "yu cai"),
    ("民生", "min sheng"), ("东风", "dong feng"), ("红旗", "hong qi"), ("向阳", "xiang yang"),
    ("永安", "yong an"), ("金山", "jin shan"), ("长安", "chang an"), ("平安", "ping an"),
)

# Urban communities are also named for a street: 石桥路社区.
_STREET_WORDS = (("路", "lu"), ("街", "jie"))

# Real street (街道) and town (镇) names of the nine central districts, from the centre outwards,
# so the generated central city reads like Chongqing. Further units get generated names.
CENTRAL_STREET_NAMES = {
    "500103": (
        "解放碑 jie fang bei", "朝天门 chao tian men", "七星岗 qi xing gang", "南纪门 nan ji men",
        "两路口 liang lu kou", "菜园坝 cai yuan ba", "上清寺 shang qing si", "大溪沟 da xi gou",
        "大坪 da ping", "石油路 shi you lu", "化龙桥 hua long qiao",
    ),
    "500104": (
        "新山村 xin shan cun", "跃进村 yue jin cun", "九宫庙 jiu gong miao", "茄子溪 qie zi xi",
        "春晖路 chun hui lu", "八桥 ba qiao", "建胜 jian sheng", "跳磴 tiao deng",
    ),
    "500105": (
        "观音桥 guan yin qiao", "华新街 hua xin jie", "五里店 wu li dian", "江北城 jiang bei cheng",
        "石马河 shi ma he", "大石坝 da shi ba", "寸滩 cun tan", "铁山坪 tie shan ping",
        "郭家沱 guo jia tuo", "鱼嘴 yu zui", "复盛 fu sheng", "五宝 wu bao",
    ),
    "500106": (
        "小龙坎 xiao long kan", "沙坪坝 sha ping ba", "磁器口 ci qi kou", "渝碚路 yu bei lu",
        "童家桥 tong jia qiao", "天星桥 tian xing qiao", "詹家溪 zhan jia xi", "石井坡 shi jing po",
        "覃家岗 qin jia gang", "新桥 xin qiao", "井口 jing kou", "歌乐山 ge le shan",
        "山洞 shan dong", "土主 tu zhu", "西永 xi yong", "虎溪 hu xi",
    ),
    "500107": (
        "杨家坪 yang jia ping", "谢家湾 xie jia wan", "黄桷坪 huang jue ping",
        "石坪桥 shi ping qiao", "石桥铺 shi qiao pu", "渝州路 yu zhou lu", "二郎 er lang",
        "九龙 jiu long", "华岩 hua yan", "中梁山 zhong liang shan", "白市驿 bai shi yi",
        "西彭 xi peng",
    ),
    "500108": (
        "南坪 nan ping", "龙门浩 long men hao", "弹子石 dan zi shi", "海棠溪 hai tang xi",
        "铜元局 tong yuan ju", "花园路 hua yuan lu", "南山 nan shan", "涂山 tu shan",
        "大佛寺 da fo si", "天文 tian wen", "鸡冠石 ji guan shi", "长生桥 chang sheng qiao",
        "峡口 xia kou", "迎龙 ying long",
    ),
    "500109": (
        "天生 tian sheng", "朝阳 chao yang", "北温泉 bei wen quan", "龙凤桥 long feng qiao",
        "东阳 dong yang", "蔡家岗 cai jia gang", "童家溪 tong jia xi", "歇马 xie ma",
        "施家梁 shi jia liang", "水土 shui tu", "复兴 fu xing", "澄江 cheng jiang",
        "天府 tian fu", "静观 jing guan", "柳荫 liu yin", "三圣 san sheng", "金刀峡 jin dao xia",
    ),
    "500112": (
        "龙溪 long xi", "龙山 long shan", "龙塔 long ta", "双龙湖 shuang long hu",
        "回兴 hui xing", "鸳鸯 yuan yang", "人和 ren he", "大竹林 da zhu lin", "礼嘉 li jia",
        "悦来 yue lai", "双凤桥 shuang feng qiao", "仙桃 xian tao", "宝圣湖 bao sheng hu",
        "王家 wang jia", "木耳 mu er", "古路 gu lu", "兴隆 xing long", "石船 shi chuan",
        "统景 tong jing", "大湾 da wan", "洛碛 luo qi", "茨竹 ci zhu",
    ),
    "500113": (
        "李家沱 li jia tuo", "花溪 hua xi", "龙洲湾 long zhou wan", "鱼洞 yu dong",
        "南泉 nan quan", "一品 yi pin", "界石 jie shi", "惠民 hui min", "安澜 an lan",
        "南彭 nan peng", "木洞 mu dong", "双河口 shuang he kou", "东温泉 dong wen quan",
        "姜家 jiang jia", "丰盛 feng sheng", "二圣 er sheng", "接龙 jie long", "石滩 shi tan",
        "石龙 shi long", "麻柳嘴 ma liu zui", "天星寺 tian xing si",
    ),
}

# English for the autonomous counties, whose short names in the boundary file drop the peoples.
AUTONOMOUS_COUNTY_EN = {
    "500240": "Shizhu Tujia Autonomous County",
    "500241": "Xiushan Tujia and Miao Autonomous County",
    "500242": "Youyang Tujia and Miao Autonomous County",
    "500243": "Pengshui Miao and Tujia Autonomous County",
}

SUFFIX = {
    "street": ("街道", "Subdistrict"),
    "town": ("镇", "Town"),
    "community": ("社区", "Community"),
    "village": ("村", "Village"),
}


def join_pinyin(syllables: list[str]) -> str:
    """'shi qiao' -> 'Shiqiao'; an apostrophe before a/o/e as in standard pinyin (Xi'an)."""
    word = syllables[0]
    for syllable in syllables[1:]:
        word += ("'" if syllable[0] in "aoe" else "") + syllable
    return word.capitalize()


def _place_names() -> list[tuple[str, str]]:
    """Every generated place name as (hanzi, pinyin syllables), in a fixed order."""
    names = [(h + t, f"{hp} {tp}") for h, hp in _HEADS for t, tp in _TAILS]
    names += [(s + "家" + t, f"{sp} jia {tp}") for s, sp in _SURNAMES for t, tp in _TAILS]
    return names


PLACE_NAMES = _place_names()
PLACE_WEIGHTS = np.ones(len(PLACE_NAMES))

# Urban communities: about a third get an auspicious name, the rest a street's (石桥路社区).
_TWO_SYLLABLE_PLACES = PLACE_NAMES[: len(_HEADS) * len(_TAILS)]
URBAN_COMMUNITY_NAMES = list(_COMMUNITY_WORDS) + [
    (place + street, f"{pinyin} {street_pinyin}")
    for place, pinyin in _TWO_SYLLABLE_PLACES
    for street, street_pinyin in _STREET_WORDS
]
URBAN_COMMUNITY_WEIGHTS = np.r_[
    np.full(len(_COMMUNITY_WORDS), len(_TWO_SYLLABLE_PLACES) / len(_COMMUNITY_WORDS)),
    np.ones(2 * len(_TWO_SYLLABLE_PLACES)),
]


def district_name_en(adcode: str, short_en: str, kind: str) -> str:
    if kind == "autonomous county":
        return AUTONOMOUS_COUNTY_EN.get(adcode, f"{short_en} Autonomous County")
    return f"{short_en} {kind.title()}"


def draw_names(
    rng: np.random.Generator,
    count: int,
    pool: list[tuple[str, str]],
    weights: np.ndarray,
    first: tuple[str, ...] = (),
) -> list[tuple[str, str]]:
    """``count`` distinct (hanzi, pinyin) names: ``first`` ("hanzi pinyin syllables") in order,
    then a weighted draw from ``pool`` skipping any name already used in either language."""
    chosen = [(entry.split(" ", 1)[0], entry.split(" ", 1)[1]) for entry in first[:count]]
    # Different hanzi can sound the same (青/清 qing), so English names are kept distinct too.
    used = {hanzi for hanzi, _ in chosen} | {join_pinyin(p.split()) for _, p in chosen}
    if count > len(chosen):
        # Weighted order without replacement (Efraimidis-Spirakis exponential keys).
        for index in np.argsort(rng.exponential(size=len(pool)) / weights, kind="stable"):
            hanzi, pinyin = pool[index]
            english = join_pinyin(pinyin.split())
            if hanzi not in used and english not in used:
                chosen.append((hanzi, pinyin))
                used.update((hanzi, english))
                if len(chosen) == count:
                    break
    if len(chosen) < count:
        raise ValueError(f"name pool too small for {count} siblings")
    return chosen


def unit_names(hanzi: str, pinyin: str, kind: str) -> tuple[str, str]:
    """A street, town, community or village name in both languages: 龙溪镇 / Longxi Town."""
    suffix_zh, suffix_en = SUFFIX[kind]
    return hanzi + suffix_zh, f"{join_pinyin(pinyin.split())} {suffix_en}"
