"""Pipe-network trace: the segments and nodes reached from one segment.

* **Drainage** follows the flow (gravity, ``from_node`` -> ``to_node``): ``downstream`` walks
  with it, ``upstream`` against it.
* **Water and gas** are pressurised, so a burst or leak is isolated by shutting valves: the
  trace walks the connected network in both directions and stops *at* valves (a valve is
  reached and reported, the pipes beyond it are not). ``direction`` is accepted for them but
  does not change the answer.

Why pgRouting's ``pgr_drivingDistance`` (cost 1 per segment) rather than a recursive CTE: the
water and gas networks have loops, and a recursive CTE can only keep a node from being
visited twice by carrying the path in every row (exponential on loops) or by bounding the
depth; a breadth-first search with a visited set is what is needed, and
``pgr_drivingDistance`` is that, returning each node's hop count as ``agg_cost`` in one call
over at most ~10,000 edges. Valves are made into dead ends by giving every valve end of a
segment a vertex of its own (``VALVE_VERTEX_BASE`` + segment id * 2 + end), so the search
reaches a valve from one side without crossing it.

In a district's or street's jurisdiction the start segment must lie in it (else 404, as for
any feature outside it), the trace walks the whole network (water does not stop at a
jurisdiction's border) and returns the segments and nodes that lie in it.
"""

from __future__ import annotations

import json

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from twin.core.errors import InvalidParameter, NotFound
from twin.core.models import NETWORKS
from twin.core.principal import CITY, Scope
from twin.core.scope import table_predicate

DIRECTIONS = ("upstream", "downstream")
# Segment ids are bigint.
MAX_SEGMENT_ID = 2**63 - 1
# Far above any pipe node id: the private vertices of valve ends.
VALVE_VERTEX_BASE = 1 << 40
# Larger than any hop count, so the search is never cut short.
UNBOUNDED_HOPS = 1e9


def check_trace(network: str, direction: str) -> None:
    if network not in NETWORKS:
        raise InvalidParameter(f"network: {network!r} is not a pipe network; "
                               f"allowed: {', '.join(NETWORKS)}")
    if direction not in DIRECTIONS:
        raise InvalidParameter(f"direction: {direction!r} is not allowed; "
                               f"allowed: {', '.join(DIRECTIONS)}")


# pgRouting runs the edge query itself, so its text carries the (validated) values,
# quoted by PostgreSQL's format(%L). Directed drainage: source -> target is the direction
# walked; pressurised networks: undirected, valve ends split off.
_EDGES_SQL = text("""
    SELECT CASE WHEN :pressurised THEN format($q$
               SELECT s.id,
                      CASE WHEN a.kind = 'valve' THEN %1$s + s.id * 2 ELSE s.from_node END
                          AS source,
                      CASE WHEN b.kind = 'valve' THEN %1$s + s.id * 2 + 1 ELSE s.to_node END
                          AS target,
                      1.0::float8 AS cost, 1.0::float8 AS reverse_cost
                 FROM pipe_segments AS s
                 JOIN pipe_nodes AS a ON a.id = s.from_node
                 JOIN pipe_nodes AS b ON b.id = s.to_node
                WHERE s.network = %2$L$q$, CAST(:valve_base AS bigint), CAST(:network AS text))
           ELSE format($q$
               SELECT id,
                      CASE WHEN %1$L = 'downstream' THEN from_node ELSE to_node END AS source,
                      CASE WHEN %1$L = 'downstream' THEN to_node ELSE from_node END AS target,
                      1.0::float8 AS cost, -1.0::float8 AS reverse_cost
                 FROM pipe_segments
                WHERE network = %2$L$q$, CAST(:direction AS text), CAST(:network AS text))
           END
""")

# {scope} (here and in _TRACE): the caller's jurisdiction, fixed SQL with bound values.
_START = """
    SELECT s.id, s.network, s.from_node, s.to_node,
           a.kind = 'valve' AS from_valve, b.kind = 'valve' AS to_valve
      FROM pipe_segments AS s
      JOIN pipe_nodes AS a ON a.id = s.from_node
      JOIN pipe_nodes AS b ON b.id = s.to_node
     WHERE s.id = :segment_id{scope}
"""

# Reached vertices -> segments entered from them -> those segments and their end nodes.
# A segment's hop is 1 + the hop of the vertex it is entered from (the start segment: 0).
_TRACE = """
    WITH reached AS (
        SELECT node AS vertex, agg_cost::int AS hop
          FROM pgr_drivingDistance(:edges_sql, CAST(:starts AS bigint[]), :max_hops,
                                   directed => NOT :pressurised, equicost => true)
    ),
    entered AS (
        SELECT id, min(hop) + 1 AS hop
          FROM (SELECT s.id, r.hop FROM reached AS r JOIN pipe_segments AS s
                    ON s.from_node = r.vertex
                 WHERE :pressurised OR :direction = 'downstream'
                UNION ALL
                SELECT s.id, r.hop FROM reached AS r JOIN pipe_segments AS s
                    ON s.to_node = r.vertex
                 WHERE :pressurised OR :direction = 'upstream'
                UNION ALL
                SELECT (r.vertex - :valve_base) / 2, r.hop FROM reached AS r
                 WHERE r.vertex >= :valve_base) AS e
         WHERE id <> :segment_id
         GROUP BY id
    ),
    segments AS (
        SELECT CAST(:segment_id AS bigint) AS id, 0 AS hop
        UNION ALL
        SELECT id, hop FROM entered
    ),
    nodes AS (
        SELECT n.id, min(x.hop) AS hop
          FROM segments AS x
          JOIN pipe_segments AS s ON s.id = x.id
          CROSS JOIN LATERAL (VALUES (s.from_node), (s.to_node)) AS n(id)
         GROUP BY n.id
    )
    SELECT 'segment' AS feature_type, s.id, s.code, s.network, x.hop, s.from_node, s.to_node,
           NULL AS kind, s.diameter_mm, s.material, s.length_m,
           ST_AsGeoJSON(s.geom, 7) AS geometry
      FROM segments AS x JOIN pipe_segments AS s ON s.id = x.id
     WHERE TRUE{segment_scope}
    UNION ALL
    SELECT 'node', n.id, n.code, n.network, x.hop, NULL, NULL, n.kind, NULL, NULL, NULL,
           ST_AsGeoJSON(n.geom, 7)
      FROM nodes AS x JOIN pipe_nodes AS n ON n.id = x.id
     WHERE TRUE{node_scope}
     ORDER BY feature_type DESC, hop, id
"""


def _start_vertices(start, direction: str, pressurised: bool) -> list[int]:
    """Where the search begins: the start segment's ends (valve ends as their own vertex)."""
    if not pressurised:
        return [start.to_node if direction == "downstream" else start.from_node]
    return [VALVE_VERTEX_BASE + start.id * 2 if start.from_valve else start.from_node,
            VALVE_VERTEX_BASE + start.id * 2 + 1 if start.to_valve else start.to_node]


def _feature(row, pressurised: bool) -> dict:
    properties = {"feature_type": row.feature_type, "id": row.id, "code": row.code,
                  "network": row.network, "hop": row.hop}
    if row.feature_type == "segment":
        properties |= {"from_node": row.from_node, "to_node": row.to_node,
                       "diameter_mm": row.diameter_mm, "material": row.material,
                       "length_m": row.length_m}
    else:
        properties |= {"kind": row.kind,
                       "stops_trace": pressurised and row.kind == "valve"}
    return {"type": "Feature", "id": f"{row.feature_type}.{row.id}",
            "geometry": json.loads(row.geometry), "properties": properties}


async def pipe_trace(conn: AsyncConnection, segment_id: int, direction: str,
                     network: str, scope: Scope = CITY) -> dict:
    """GeoJSON FeatureCollection of the segments and nodes reached from ``segment_id``
    (those in the caller's scope)."""
    check_trace(network, direction)
    if not 1 <= segment_id <= MAX_SEGMENT_ID:
        raise InvalidParameter(f"segment_id: must be a positive integer, got {segment_id}")
    segments_in = table_predicate(scope, "pipe_segments", "s", "scope_s")
    nodes_in = table_predicate(scope, "pipe_nodes", "n", "scope_n")
    start = (await conn.execute(text(_START.format(scope=segments_in.and_sql)),
                                {"segment_id": segment_id} | segments_in.params)).first()
    if start is None:
        raise NotFound(f"segment_id: no pipe segment {segment_id}")
    if start.network != network:
        raise InvalidParameter(f"network: segment {segment_id} belongs to the "
                               f"{start.network} network, not {network}")
    pressurised = network != "drainage"
    params = {"network": network, "direction": direction, "pressurised": pressurised,
              "valve_base": VALVE_VERTEX_BASE, "segment_id": segment_id}
    edges_sql = (await conn.execute(_EDGES_SQL, params)).scalar_one()
    trace = _TRACE.format(segment_scope=segments_in.and_sql, node_scope=nodes_in.and_sql)
    rows = (await conn.execute(text(trace), params | segments_in.params | nodes_in.params | {
        "edges_sql": edges_sql, "max_hops": UNBOUNDED_HOPS,
        "starts": _start_vertices(start, direction, pressurised),
    })).all()
    features = [_feature(row, pressurised) for row in rows]
    segments = sum(1 for f in features if f["properties"]["feature_type"] == "segment")
    return {
        "type": "FeatureCollection",
        "query": {"segment_id": segment_id, "direction": direction, "network": network,
                  "mode": "flow" if not pressurised else "connected, stopping at valves"},
        "numberSegments": segments,
        "numberNodes": len(features) - segments,
        "features": features,
    }
