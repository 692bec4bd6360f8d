-- Rewrites risk_point_h3_counts in the order of place (a 5-character geohash, ~5 km), so the
-- rows a hexagon tile reads lie in a few hundred pages instead of one page each (the
-- statement-level triggers insert a bulk load's rows in hash order: 2,490 pages for a
-- zoom-10 tile's 4,721 rows; 161 once ordered). Not ordered by the primary key: rows of one
-- resolution packed together make the planner prefer a primary-key range scan over the
-- tile's GiST index, which reads every cell of that resolution in the city.
CREATE TEMP TABLE risk_point_h3_counts_ordered ON COMMIT DROP AS
SELECT * FROM risk_point_h3_counts ORDER BY ST_GeoHash(anchor, 5), res, cell;
DELETE FROM risk_point_h3_counts;
INSERT INTO risk_point_h3_counts SELECT * FROM risk_point_h3_counts_ordered;
