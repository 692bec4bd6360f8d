// zh-CN first; English on demand. Names that live in the data (sectors, layers, units, teams)
// come with both languages from the API; only the interface's own words are here.

export type Lang = "zh" | "en";

const WORDS: Record<string, [string, string]> = {
  "title": ["城市运行风险一张图", "City operations risk map"],
  "error.start": ["地图启动失败", "The map could not start"],
  "nav.map": ["地图", "Map"],
  "nav.upload": ["上传图层", "Upload a layer"],
  "toggle.3d": ["三维建筑", "3D buildings"],
  "view.to3d": ["三维视图", "3D view"],
  "view.to2d": ["二维地图", "2D map"],
  "view.loading": ["三维视图加载中…", "Loading the 3D view…"],
  "view.failed": ["三维视图启动失败", "The 3D view could not start"],
  "globe.cim": ["CIM 等级", "CIM grades"],
  "globe.colour": ["建筑着色", "Building colours"],
  "globe.colour.use": ["按用途", "By use"],
  "globe.colour.cim": ["按 CIM 等级", "By CIM grade"],
  "globe.riskShown": ["当前视野风险点", "Risk points in view"],
  "globe.riskTooHigh": ["视点过高：放大后显示风险点", "Zoom in to show the risk points"],
  "globe.noTerrain": ["地形服务不可用，以椭球面代替", "Terrain service unavailable: the ellipsoid stands in"],
  "globe.noBuildings": ["建筑三维瓦片不可用", "Building 3D tiles unavailable"],
  "cim.1": ["地表模型", "surface model"],
  "cim.2": ["框架模型", "framework model"],
  "cim.3": ["标准模型", "standard model"],
  "cim.4": ["精细模型", "detailed model"],
  "cim.5": ["功能模型", "functional model"],
  "cim.6": ["构件模型", "component model"],
  "use.residential": ["住宅", "Residential"],
  "use.commercial": ["商业", "Commercial"],
  "use.office": ["办公", "Office"],
  "use.industrial": ["工业", "Industrial"],
  "use.public": ["公共建筑", "Public"],
  "use.school": ["学校", "School"],
  "use.hospital": ["医院", "Hospital"],
  "roof.flat": ["平屋顶", "Flat"],
  "roof.gable": ["双坡屋顶", "Gable"],
  "roof.hip": ["四坡屋顶", "Hip"],
  "card.building": ["建筑", "Building"],
  "card.buildingId": ["建筑编号", "Building id"],
  "card.use": ["用途", "Use"],
  "card.height": ["高度", "Height"],
  "card.floors": ["层数", "Floors"],
  "card.cim": ["CIM 等级", "CIM grade"],
  "card.roof": ["屋顶", "Roof"],
  "filters.sectors": ["七大板块", "Sectors"],
  "filters.levels": ["风险等级", "Risk levels"],
  "layers.title": ["图层", "Layers"],
  "layers.uploaded": ["上传", "uploaded"],
  "kind.raster": ["栅格", "raster"],
  "kind.3d": ["三维模型", "3D model"],
  "level.1": ["重大风险", "Major"],
  "level.2": ["较大风险", "Large"],
  "level.3": ["一般风险", "General"],
  "level.4": ["低风险", "Low"],
  "layer.districts": ["区县", "Districts"],
  "layer.streets": ["镇街", "Streets and towns"],
  "layer.communities": ["村社", "Communities"],
  "layer.grids": ["网格", "Grid cells"],
  "layer.hexagons": ["风险热力（H3 六边形）", "Risk hexagons (H3)"],
  "layer.risk_points": ["风险点", "Risk points"],
  "layer.pipes": ["地下管网", "Pipe networks"],
  "layer.teams": ["应急队伍", "Response teams"],
  "layer.depots": ["应急物资库", "Supply depots"],
  "layer.buildings": ["建筑（三维）", "Buildings (3D)"],
  "card.close": ["关闭", "Close"],
  "card.sector": ["板块", "Sector"],
  "card.category": ["类别", "Category"],
  "card.level": ["等级", "Level"],
  "card.grid": ["网格", "Grid"],
  "card.community": ["村社", "Community"],
  "card.street": ["镇街", "Street"],
  "card.district": ["区县", "District"],
  "card.plan": ["应急预案", "Emergency plan"],
  "card.noPlan": ["未关联预案", "No plan linked"],
  "card.teams": ["最近应急队伍（道路通行时间）", "Nearest teams (road travel time)"],
  "card.route": ["显示最近队伍路线", "Show the nearest team's route"],
  "card.routeShown": ["路线已显示", "Route shown"],
  "card.unreachable": ["道路不可达", "unreachable by road"],
  "card.loading": ["加载中…", "Loading…"],
  "card.location": ["位置", "Location"],
  "card.reach": ["道路可达范围", "Reachable by road"],
  "card.outside": ["该位置不在市域范围内", "This spot is outside the municipality"],
  "card.responsible": ["责任队伍", "Responsible teams"],
  "minutes": ["分钟", "min"],
  "reach.risk_points": ["风险点", "risk points"],
  "reach.hazard_sources": ["危险源", "hazard sources"],
  "reach.buildings": ["建筑", "buildings"],
  "pipes.title": ["管网异常", "Pipe anomalies"],
  "pipes.refresh": ["刷新", "Refresh"],
  "pipes.none": ["暂无异常", "No anomalies"],
  "pipes.unavailable": ["管网异常服务不可用", "Pipe anomaly service unavailable"],
  "pipes.source": ["源管段", "Source segment"],
  "pipes.segments": ["受影响管段", "Affected segments"],
  "pipes.atRisk": ["受威胁对象", "At risk"],
  "pipes.communities": ["村社", "Communities"],
  "pipes.riskPoints": ["风险点", "Risk points"],
  "pipes.buildings": ["建筑", "Buildings"],
  "pipes.downstream": ["下游管段", "Downstream segments"],
  "severity": ["严重度", "Severity"],
  "severity.major": ["严重", "major"],
  "severity.moderate": ["中等", "moderate"],
  "severity.minor": ["轻微", "minor"],
  "pipes.window": ["时段", "Period"],
  "pipes.sensors": ["报警传感器", "Alarming sensors"],
  "network.drainage": ["排水", "Drainage"],
  "network.water": ["供水", "Water"],
  "network.gas": ["燃气", "Gas"],
  "stats.title": ["当前视野风险点统计", "Risk points in view"],
  "stats.total": ["合计", "Total"],
  "upload.title": ["上传图层", "Upload a layer"],
  "upload.help": ["支持 GeoJSON、Shapefile（zip）、GeoPackage、KML/KMZ、CSV（经纬度）、GeoTIFF、glTF/GLB。",
    "GeoJSON, zipped Shapefile, GeoPackage, KML/KMZ, CSV with lon/lat, GeoTIFF, glTF/GLB."],
  "upload.file": ["文件", "File"],
  "upload.layerTitle": ["图层名称", "Layer title"],
  "upload.crs": ["坐标系", "Coordinate reference system"],
  "upload.crsAuto": ["自动识别", "Detect from the file"],
  "upload.datum": ["偏移坐标", "Offset datum"],
  "upload.datumNone": ["无（WGS84/CGCS2000）", "None (WGS84/CGCS2000)"],
  "upload.gcj02": ["GCJ-02（高德、腾讯）", "GCJ-02 (Amap, Tencent)"],
  "upload.bd09": ["BD-09（百度）", "BD-09 (Baidu)"],
  "upload.key": ["访问密钥", "API key"],
  "upload.submit": ["上传", "Upload"],
  "upload.show": ["在地图上查看", "Show on the map"],
  "upload.sending": ["正在发送文件…", "Sending the file…"],
  "upload.succeeded": ["发布成功", "Published"],
  "upload.failed": ["上传失败", "Upload failed"],
  "upload.crsNeeded": ["文件没有声明坐标系（如 Shapefile 缺少 .prj）。请选择数据的坐标系后重试：",
    "The file names no coordinate reference system (e.g. a Shapefile without .prj). "
    + "Choose the data's CRS and try again:"],
  "upload.retry": ["用此坐标系重试", "Retry with this CRS"],
  "team.fire": ["消防", "Fire"],
  "team.medical": ["医疗", "Medical"],
  "team.police": ["公安", "Police"],
  "team.rescue": ["救援", "Rescue"],
  "team.utility_repair": ["抢修", "Utility repair"],
};

let current: Lang = (localStorage.getItem("twin.lang") as Lang | null) ?? "zh";
const listeners: Array<() => void> = [];

export function lang(): Lang {
  return current;
}

export function t(key: string): string {
  const pair = WORDS[key];
  return pair ? pair[current === "zh" ? 0 : 1] : key;
}

/** The name in the current language from a record holding ``<prefix>_zh`` and ``<prefix>_en``. */
export function named(record: object, prefix = "name"): string {
  const fields = record as Record<string, unknown>;
  const zh = fields[`${prefix}_zh`] as string | undefined;
  const en = fields[`${prefix}_en`] as string | undefined;
  return (current === "zh" ? zh || en : en || zh) ?? "";
}

export function applyStatic(root: ParentNode = document): void {
  for (const el of root.querySelectorAll<HTMLElement>("[data-i18n]")) {
    el.textContent = t(el.dataset.i18n!);
  }
  document.documentElement.lang = current === "zh" ? "zh-CN" : "en";
  document.title = `${t("title")} · twin`;
}

export function onLangChange(listener: () => void): void {
  listeners.push(listener);
}

export function setLang(next: Lang): void {
  current = next;
  localStorage.setItem("twin.lang", next);
  applyStatic();
  for (const listener of listeners) listener();
}
