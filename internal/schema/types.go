package schema

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// The types of the columns, and every type they are made of: a domain's
// base type, an array's element, a range's subtype (and a multirange's
// range), a composite's attributes. Two properties are derived from this
// graph, by type and never by a type's name:
//
//   - stable: the type's text form does not depend on session settings.
//     Change capture renders keys as text in the writer's session and pins
//     the settings only where a key's type is not stable.
//   - def: what the type is, where its name does not say it all (a domain
//     over numeric(10,2) is not a domain over numeric(10,0)), so that the
//     preconditions compare columns by what they hold.

// stableBase are the base types whose text form no session setting changes.
// Everything else is taken to depend on one: dates and times (DateStyle,
// TimeZone), intervals (IntervalStyle), floating point and the geometric
// types made of it (extra_float_digits), bytea (bytea_output), money
// (lc_monetary), reg* types (search_path), and base types PostgreSQL does
// not ship, whose output functions swo cannot know.
var stableBase = []string{"bool", "char", "name", "int8", "int2", "int2vector", "int4", "text", "oid", "tid", "xid", "xid8",
	"cid", "oidvector", "json", "jsonb", "jsonpath", "xml", "cidr", "inet", "macaddr", "macaddr8", "bpchar", "varchar",
	"bit", "varbit", "numeric", "uuid", "pg_lsn", "tsvector", "tsquery"}

type typeNode struct {
	kind       byte   // pg_type.typtype: b base, c composite, d domain, e enum, r range, m multirange
	array      bool   // a true array (its element is elem)
	stableBase bool   // one of stableBase
	reg        bool   // a reg* type (pg_catalog.regclass, …)
	name       string // format_type without typmod
	domainOf   string // a domain's base type with its typmod
	base, elem uint32 // a domain's base type; an array's (or fixed-length subscripted type's) element
	subtype    uint32 // a range's subtype; a multirange's range
	attrs      []string
	attrTypes  []uint32
}

type typeGraph map[uint32]*typeNode

// readTypes reads the graph of the types of the relations' columns.
func readTypes(ctx context.Context, tx pgx.Tx, relOIDs []uint32) (typeGraph, error) {
	rows, err := tx.Query(ctx, `
WITH RECURSIVE walk(t) AS (
	SELECT DISTINCT a.atttypid FROM pg_attribute a WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped
	UNION
	SELECT x.child FROM walk w JOIN pg_type ty ON ty.oid = w.t
	CROSS JOIN LATERAL (
		SELECT ty.typbasetype WHERE ty.typtype = 'd'
		UNION ALL SELECT ty.typelem WHERE ty.typelem <> 0
		UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = ty.oid
		UNION ALL SELECT r.rngtypid FROM pg_range r WHERE r.rngmultitypid = ty.oid
		UNION ALL SELECT a.atttypid FROM pg_attribute a WHERE ty.typrelid <> 0 AND a.attrelid = ty.typrelid AND a.attnum > 0 AND NOT a.attisdropped
	) x(child)
)
SELECT ty.oid, ty.typtype, ty.typcategory = 'A' AND ty.typelem <> 0,
	ty.typnamespace = 'pg_catalog'::regnamespace AND ty.typname = ANY($2),
	ty.typnamespace = 'pg_catalog'::regnamespace AND ty.typname LIKE 'reg%',
	format_type(ty.oid, NULL),
	CASE WHEN ty.typtype = 'd' THEN format_type(ty.typbasetype, ty.typtypmod) || CASE WHEN ty.typnotnull THEN ' not null' ELSE '' END ELSE '' END,
	ty.typbasetype, ty.typelem,
	coalesce((SELECT rngsubtype FROM pg_range WHERE rngtypid = ty.oid), (SELECT rngtypid FROM pg_range WHERE rngmultitypid = ty.oid), 0),
	ARRAY(SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
		WHERE ty.typrelid <> 0 AND a.attrelid = ty.typrelid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum)::text[],
	ARRAY(SELECT a.atttypid FROM pg_attribute a
		WHERE ty.typrelid <> 0 AND a.attrelid = ty.typrelid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum)::oid[]
FROM walk w JOIN pg_type ty ON ty.oid = w.t`, relOIDs, stableBase)
	if err != nil {
		return nil, err
	}
	g := typeGraph{}
	for rows.Next() {
		var oid uint32
		var kind string
		n := &typeNode{}
		if err := rows.Scan(&oid, &kind, &n.array, &n.stableBase, &n.reg, &n.name, &n.domainOf, &n.base, &n.elem, &n.subtype, &n.attrs, &n.attrTypes); err != nil {
			return nil, err
		}
		n.kind = kind[0]
		g[oid] = n
	}
	return g, rows.Err()
}

// maxTypeDepth bounds the walks (PostgreSQL forbids cycles; this is a guard).
const maxTypeDepth = 32

// stable reports whether the type's text form is independent of session
// settings: a base type must be stable by itself, and every type it is made
// of must be stable.
func (g typeGraph) stable(oid uint32, depth int) bool {
	n := g[oid]
	if n == nil || depth > maxTypeDepth {
		return false
	}
	var parts []uint32
	switch n.kind {
	case 'd':
		parts = []uint32{n.base}
	case 'c':
		parts = n.attrTypes
	case 'r', 'm':
		parts = []uint32{n.subtype}
	case 'e':
	case 'b':
		if !n.array && !n.stableBase {
			return false
		}
		if n.elem != 0 {
			parts = []uint32{n.elem}
		}
	default:
		return false
	}
	for _, p := range parts {
		if !g.stable(p, depth+1) {
			return false
		}
	}
	return true
}

// namesObjects reports whether the type is or contains a reg* type.
func (g typeGraph) namesObjects(oid uint32, depth int) bool {
	n := g[oid]
	if n == nil || depth > maxTypeDepth {
		return false
	}
	if n.reg {
		return true
	}
	parts := append([]uint32{n.base, n.elem, n.subtype}, n.attrTypes...)
	for _, p := range parts {
		if p != 0 && g.namesObjects(p, depth+1) {
			return true
		}
	}
	return false
}

// def renders what the type is made of; "" for a type its name describes
// entirely (a base or enum type).
func (g typeGraph) def(oid uint32, depth int) string {
	n := g[oid]
	if n == nil || depth > maxTypeDepth {
		return ""
	}
	inner := func(child uint32, name string) string {
		if d := g.def(child, depth+1); d != "" {
			return name + " " + d
		}
		return name
	}
	switch {
	case n.kind == 'd':
		return fmt.Sprintf("(domain over %s)", inner(n.base, n.domainOf))
	case n.kind == 'c':
		attrs := make([]string, len(n.attrs))
		for i, a := range n.attrs {
			attrs[i] = inner(n.attrTypes[i], a)
		}
		return "(" + strings.Join(attrs, ", ") + ")"
	case n.kind == 'r' || n.kind == 'm':
		if sub := g[n.subtype]; sub != nil {
			return "(of " + inner(n.subtype, sub.name) + ")"
		}
	case n.array:
		if d := g.def(n.elem, depth+1); d != "" {
			return "(of " + d + ")"
		}
	}
	return ""
}
