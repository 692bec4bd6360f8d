"""Independent oracles shared by several test modules (networkx, not pgRouting)."""

from __future__ import annotations

import networkx as nx
import pandas as pd
from sqlalchemy import Engine, text


def road_nodes(engine: Engine) -> pd.DataFrame:
    """Every road node's id, lon and lat, by id."""
    return pd.read_sql(text("SELECT id, ST_X(geom) AS lon, ST_Y(geom) AS lat FROM road_nodes "
                            "ORDER BY id"), engine)


def drive_graph(engine: Engine) -> nx.DiGraph:
    """The road graph as driven: u->v costs cost_s, v->u reverse_cost_s (< 0: closed).

    Of parallel edges the cheaper one counts, as it does for pgRouting's Dijkstra.
    """
    edges = pd.read_sql(text("SELECT source, target, cost_s, reverse_cost_s FROM road_edges"),
                        engine)
    graph = nx.DiGraph()
    for source, target, cost, reverse in edges.itertuples(index=False):
        for u, v, c in ((source, target, cost), (target, source, reverse)):
            if c >= 0 and (not graph.has_edge(u, v) or graph[u][v]["cost"] > c):
                graph.add_edge(u, v, cost=c)
    return graph
