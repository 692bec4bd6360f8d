"""One pipe network as a sparse graph over node indices, for hop counts and paths in numpy.

Drainage is directed (``from_node`` -> ``to_node`` is the flow); water and gas are not.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix, vstack
from scipy.sparse.csgraph import dijkstra
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

# Searches run this many sources at a time so a dense (sources x nodes) block stays small.
CHUNK = 256

# Three arrays rather than rows: one Python object per column, not per segment.
_SEGMENTS = text("""
    SELECT coalesce(array_agg(id ORDER BY id), '{}'),
           coalesce(array_agg(from_node ORDER BY id), '{}'),
           coalesce(array_agg(to_node ORDER BY id), '{}')
      FROM pipe_segments WHERE network = :network
""")


class PipeGraph:
    def __init__(self, segment_ids, from_nodes, to_nodes, directed: bool):
        self.segment_ids = np.asarray(segment_ids, dtype=np.int64)
        self.node_ids = np.unique(np.concatenate([from_nodes, to_nodes]).astype(np.int64))
        self.src = np.searchsorted(self.node_ids, from_nodes)
        self.dst = np.searchsorted(self.node_ids, to_nodes)
        self.directed = directed
        n = self.node_ids.size
        self.matrix = csr_matrix((np.ones(self.src.size), (self.src, self.dst)), shape=(n, n))
        if not directed:
            self.matrix = (self.matrix + self.matrix.T).tocsr()
        self.segment_of: dict[tuple[int, int], int] = {}
        for seg, a, b in zip(self.segment_ids.tolist(), self.src.tolist(), self.dst.tolist(),
                             strict=True):
            self.segment_of.setdefault((a, b), seg)
            if not directed:
                self.segment_of.setdefault((b, a), seg)

    def index(self, node_id: int) -> int | None:
        """The node's index, or None when no segment of this network touches it."""
        k = int(np.searchsorted(self.node_ids, node_id))
        return k if k < self.node_ids.size and self.node_ids[k] == node_id else None

    def reach(self, sources: np.ndarray, limit: int) -> csr_matrix:
        """Sparse (sources x nodes): 1 + hops to every node within ``limit`` hops, else empty.

        Drainage counts hops with the flow.
        """
        blocks = []
        for chunk in np.array_split(sources, max(1, -(-sources.size // CHUNK))):
            hops = dijkstra(self.matrix, directed=self.directed, indices=chunk,
                            unweighted=True, limit=limit)
            blocks.append(csr_matrix(np.where(np.isfinite(hops), hops + 1, 0)))
        return vstack(blocks).tocsr()

    def tree_to(self, root: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """(hops, predecessors) of the shortest ways *to* ``root`` within ``limit`` hops.

        Drainage: against the flow from the root, i.e. the nodes draining to it.
        """
        matrix = self.matrix.T.tocsr() if self.directed else self.matrix
        hops, pred = dijkstra(matrix, directed=self.directed, indices=root, unweighted=True,
                              limit=limit, return_predecessors=True)
        return hops, pred

    def path_to_root(self, pred: np.ndarray, node: int) -> list[int]:
        """Segment ids from ``node`` to the root of ``tree_to``'s predecessors, in order."""
        segments = []
        while pred[node] >= 0:
            segments.append(self.segment_of[(node, int(pred[node]))])
            node = int(pred[node])
        return segments

    def segments_from(self, node: int) -> list[int]:
        """Segments leaving ``node`` (drainage: with the flow; else every one touching it)."""
        return self.segment_ids[self.src == node].tolist() if self.directed \
            else self.segments_touching(node)

    def segments_touching(self, node: int) -> list[int]:
        return self.segment_ids[(self.src == node) | (self.dst == node)].tolist()


async def load_graph(conn: AsyncConnection, network: str) -> PipeGraph:
    ids, from_nodes, to_nodes = (await conn.execute(_SEGMENTS, {"network": network})).one()
    segment_ids, src, dst = (np.array(c, dtype=np.int64) for c in (ids, from_nodes, to_nodes))
    return PipeGraph(segment_ids, src, dst, directed=network == "drainage")
