package schema

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Shape is what decides whether every change to the moved data is
// captured by its triggers, and whether the rows can be moved as they are:
// one entry per table, sequence and type, keyed "table public.orders",
// holding a rendering of its definition. It is taken in the snapshot of the
// schema read that the run is planned from, and again in the final sync:
// any difference means DDL changed something no trigger sees (a rewrite
// such as ALTER COLUMN … TYPE … USING, a column dropped and added again, a
// default applied to existing rows by ADD COLUMN, an enum label renamed, a
// relationship or a policy changed, a table or sequence created), and the
// run must not switch.
type Shape map[string]string

// ShapeSQL selects the rows of a Shape: every table and sequence of the
// user schemas (not the library's, not extensions' own), with the full
// definition of the moved tables (moved: their oids), of partitioned tables
// and of the types reachable from the moved tables' columns.
func ShapeSQL(moved []uint32, librarySchema string) string {
	oids := make([]string, len(moved))
	for i, o := range moved {
		oids[i] = fmt.Sprint(o)
	}
	list := "'{" + strings.Join(oids, ",") + "}'::pg_catalog.oid[]"
	return fmt.Sprintf(`WITH RECURSIVE moved(oid) AS (SELECT pg_catalog.unnest(%[1]s)),
types(t) AS (
	SELECT DISTINCT a.atttypid FROM pg_catalog.pg_attribute a JOIN moved m ON a.attrelid = m.oid WHERE a.attnum > 0
	UNION
	SELECT x.child FROM types w JOIN pg_catalog.pg_type ty ON ty.oid = w.t
	CROSS JOIN LATERAL (
		SELECT ty.typbasetype WHERE ty.typtype = 'd'
		UNION ALL SELECT ty.typelem WHERE ty.typelem <> 0
		UNION ALL SELECT r.rngsubtype FROM pg_catalog.pg_range r WHERE r.rngtypid = ty.oid
		UNION ALL SELECT a.atttypid FROM pg_catalog.pg_attribute a WHERE ty.typrelid <> 0 AND a.attrelid = ty.typrelid AND a.attnum > 0
	) x(child)
)
SELECT 'table', n.nspname::text, c.relname::text, '', '',
	c.oid::text || ' ' || c.relkind::text ||
	CASE WHEN c.oid IN (SELECT oid FROM moved) OR c.relkind = 'p' THEN
		' storage ' || c.relfilenode::text || ' rls ' || c.relrowsecurity::text || c.relforcerowsecurity::text ||
		' bound ' || coalesce(c.relpartbound::text, '') ||
		' parents ' || coalesce((SELECT pg_catalog.string_agg(i.inhparent::text, ',' ORDER BY i.inhseqno) FROM pg_catalog.pg_inherits i WHERE i.inhrelid = c.oid), '') ||
		' policies ' || coalesce((SELECT pg_catalog.string_agg(p.polname::text || p.polcmd::text || p.polpermissive::text || p.polroles::text ||
			coalesce(p.polqual::text, '') || coalesce(p.polwithcheck::text, ''), ';' ORDER BY p.polname) FROM pg_catalog.pg_policy p WHERE p.polrelid = c.oid), '') ||
		' columns ' || coalesce((SELECT pg_catalog.string_agg(a.attnum::text || ' ' || a.attname::text || ' ' || a.atttypid::text || ' ' || a.atttypmod::text ||
			' ' || a.attisdropped::text || ' ' || a.attgenerated::text || a.attidentity::text || ' ' || a.attcollation::text ||
			' ' || a.atthasmissing::text || coalesce(a.attmissingval::text, '') ||
			coalesce((SELECT ' = ' || d.adbin::text FROM pg_catalog.pg_attrdef d WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum AND a.attgenerated <> ''), ''),
			';' ORDER BY a.attnum) FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0), '')
	WHEN c.relispartition THEN
		' partition of ' || (SELECT i.inhparent::text FROM pg_catalog.pg_inherits i WHERE i.inhrelid = c.oid)
	ELSE '' END
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
	AND n.nspname NOT IN ('pg_catalog', 'information_schema', %[2]s) AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
	AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = c.oid AND d.deptype = 'e')
UNION ALL
SELECT 'sequence', n.nspname::text, c.relname::text, coalesce(tn.nspname::text, ''), coalesce(tc.relname::text, ''),
	c.oid::text || ' ' || s.seqtypid::text || ' ' || s.seqincrement::text || ' ' || s.seqmin::text || ' ' || s.seqmax::text || ' ' || s.seqcycle::text
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace JOIN pg_catalog.pg_sequence s ON s.seqrelid = c.oid
LEFT JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = c.oid
	AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.deptype IN ('a', 'i')
LEFT JOIN pg_catalog.pg_class tc ON tc.oid = d.refobjid LEFT JOIN pg_catalog.pg_namespace tn ON tn.oid = tc.relnamespace
WHERE c.relkind = 'S' AND c.relpersistence <> 't'
	AND n.nspname NOT IN ('pg_catalog', 'information_schema', %[2]s) AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
	AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend e WHERE e.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND e.objid = c.oid AND e.deptype = 'e')
UNION ALL
SELECT 'type', n.nspname::text, ty.typname::text, '', '',
	ty.typtype::text || ' ' || ty.typbasetype::text || ' ' || ty.typtypmod::text || ' ' || ty.typnotnull::text ||
	' labels ' || coalesce((SELECT pg_catalog.string_agg(e.enumlabel::text, ',' ORDER BY e.enumsortorder) FROM pg_catalog.pg_enum e WHERE e.enumtypid = ty.oid), '') ||
	' attributes ' || coalesce((SELECT pg_catalog.string_agg(a.attnum::text || ' ' || a.attname::text || ' ' || a.atttypid::text || ' ' || a.atttypmod::text || ' ' || a.attisdropped::text, ';' ORDER BY a.attnum)
		FROM pg_catalog.pg_attribute a WHERE ty.typrelid <> 0 AND a.attrelid = ty.typrelid AND a.attnum > 0), '')
FROM types w JOIN pg_catalog.pg_type ty ON ty.oid = w.t JOIN pg_catalog.pg_namespace n ON n.oid = ty.typnamespace
WHERE ty.typtype IN ('c', 'd', 'e', 'r')`, list, quoteLiteral(librarySchema))
}

// ReadShape runs ShapeSQL on q and keeps what a switchover excluding those
// patterns moves or could miss: excluded tables, and sequences owned by
// excluded tables, are left out (their DDL does not concern the run).
func ReadShape(ctx context.Context, q interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}, sql string, exclude []string) (Shape, error) {
	rows, err := q.Query(ctx, sql)
	if err != nil {
		return nil, err
	}
	return CollectShape(rows, exclude)
}

// CollectShape reads the rows of ShapeSQL (see ReadShape).
func CollectShape(rows pgx.Rows, exclude []string) (Shape, error) {
	defer rows.Close()
	s := Shape{}
	for rows.Next() {
		var kind, sch, name, ownerSchema, ownerName, detail string
		if err := rows.Scan(&kind, &sch, &name, &ownerSchema, &ownerName, &detail); err != nil {
			return nil, err
		}
		switch {
		case kind == "table" && Excluded(exclude, sch, name):
			continue
		case kind == "sequence" && ownerName != "" && Excluded(exclude, ownerSchema, ownerName):
			continue
		}
		s[kind+" "+Name(sch, name)] = detail
	}
	return s, rows.Err()
}

// Changed names what changed from s to now, "" if nothing did.
func (s Shape) Changed(now Shape) string {
	return abbreviateList(s.diff(now), 10)
}

// NewPartitions splits what changed from s to now: the tables created since
// s that are plain partitions (not partitioned themselves) of one of the
// parents (by oid) are returned (their oids), and Changed is applied to the
// rest. A partition-premaking job creates such tables, empty, ahead of the
// rows that will go into them; the final sync can move them (see
// replicate.Engine.Final).
func (s Shape) NewPartitions(now Shape, parents map[uint32]bool) (oids []uint32, changed string) {
	rest := Shape{}
	for k, v := range now {
		if _, old := s[k]; !old && strings.HasPrefix(k, "table ") {
			var oid, parent uint32
			var kind string
			if n, _ := fmt.Sscanf(v, "%d %s partition of %d", &oid, &kind, &parent); n == 3 && kind == "r" && parents[parent] {
				oids = append(oids, oid)
				continue
			}
		}
		rest[k] = v
	}
	slices.Sort(oids)
	return oids, s.Changed(rest)
}
func (s Shape) diff(now Shape) []string {
	var out []string
	for k, v := range s {
		switch w, ok := now[k]; {
		case !ok:
			out = append(out, k+" was dropped")
		case w != v:
			out = append(out, k+" was altered")
		}
	}
	for k := range now {
		if _, ok := s[k]; !ok {
			out = append(out, k+" was created")
		}
	}
	sort.Strings(out)
	return out
}
