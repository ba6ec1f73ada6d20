package schema

import (
	"fmt"
	"slices"
	"strings"
)

// Problem is one reason the switchover cannot run, naming its object.
type Problem struct {
	Object string // "public.orders", "public.orders.total", "database", …
	Issue  string
}

func (p Problem) String() string { return p.Object + ": " + p.Issue }

// Problems is a list of problems; as an error it lists them all.
type Problems []Problem

func (ps Problems) Error() string {
	lines := make([]string, len(ps))
	for i, p := range ps {
		lines[i] = "  - " + p.String()
	}
	return fmt.Sprintf("%d problem(s):\n%s", len(ps), strings.Join(lines, "\n"))
}

// Check compares a source and a target database and lists every reason the
// target cannot receive the source's data exactly: missing tables, columns
// or sequences; different types, collations, generated columns, primary
// keys, relationships (inheritance, partition bounds), row level security
// or policies; tables without a primary key; foreign keys between synced and
// excluded tables; rows the roles could not all read or write; rules that
// would rewrite the sync's deletes; missing privileges; and every kind of
// object the inventory refuses or does not know. src and dst must be
// restricted (Select) alike.
func Check(src, dst *Database, exclude []string) Problems {
	var ps Problems
	add := func(obj, format string, args ...any) {
		ps = append(ps, Problem{Object: obj, Issue: fmt.Sprintf(format, args...)})
	}
	ps = append(ps, src.inventoryProblems(exclude)...)
	for _, fk := range src.PartitionedFKs {
		add(fk, "foreign keys on or to partitioned tables are not supported: drop the constraint during the switchover, or exclude the tables")
	}
	for _, s := range src.Tables {
		name := s.String()
		if len(s.PrimaryKey) == 0 {
			add(name, "has no primary key: add one, or exclude the table (Config.ExcludeTables) if it need not move")
		}
		if !s.CanSelect {
			add(name, "the old database's role may not SELECT from it: GRANT SELECT ON %s TO <role>", s.QName())
		}
		if !s.IsOwner {
			add(name, "the old database's role does not own it: change capture creates triggers on it and enables them ALWAYS (ALTER TABLE), which needs ownership, not only the TRIGGER privilege: ALTER TABLE %s OWNER TO <role>", s.QName())
		}
		if src.subjectToRLS(s) {
			add(name, "row level security hides rows from the old database's role %s (the sync would miss them): ALTER ROLE %s BYPASSRLS for the switchover, or make it the table's owner without FORCE ROW LEVEL SECURITY",
				src.Role.Name, src.Role.Name)
		}
		for _, fk := range s.ForeignKeys() {
			if Excluded(exclude, fk.Ref.Schema, fk.Ref.Name) {
				add(name, "foreign key %s references excluded table %s: exclude both or neither", fk.Name, fk.RefTable)
			}
		}
		d := dst.Table(name)
		if d == nil {
			add(name, "table missing in the new database: create the schema there first (run your migrations)")
			continue
		}
		if !d.IsOwner {
			add(name, "the new database's role does not own it: the sync drops and restores its indexes and constraints and disables its triggers, which needs ownership (ALTER TABLE %s OWNER TO <role>)", d.QName())
		}
		if dst.subjectToRLS(d) {
			add(name, "row level security applies to the new database's role %s on this table (FORCE ROW LEVEL SECURITY): the sync could not write every row; ALTER ROLE %s BYPASSRLS for the switchover",
				dst.Role.Name, dst.Role.Name)
		}
		for _, r := range d.DeleteRules {
			add(name, "rule %s in the new database rewrites DELETE on this table, which the sync uses: drop it for the switchover and create it again after", r)
		}
		checkColumns(s, d, add)
		// Each database's sessions use its own search_path (the new
		// database's functions and index expressions may need it); values
		// that name objects read relative to it.
		if src.SearchPath != dst.SearchPath {
			for _, col := range s.Columns {
				if col.NamesObjects {
					add(name+"."+col.Name, "its values name objects (%s), which read relative to search_path, and the databases' search_path differ (%q in the old, %q in the new): set the same search_path for the role or database in both",
						col.Type, src.SearchPath, dst.SearchPath)
				}
			}
		}
		if !slices.Equal(s.PrimaryKey, d.PrimaryKey) {
			add(name, "primary key (%s) in the old database, (%s) in the new one", strings.Join(s.PrimaryKey, ", "), strings.Join(d.PrimaryKey, ", "))
		}
		checkRelation(s, d, add)
	}
	// Partitioned tables hold no rows, but their place in the partition
	// tree and their policies decide what queries through them see.
	dstParted := map[string]*Table{}
	for _, t := range dst.Partitioned {
		dstParted[t.String()] = t
	}
	for _, s := range src.Partitioned {
		d := dstParted[s.String()]
		if d == nil {
			add(s.String(), "partitioned table missing in the new database")
			continue
		}
		checkRelation(s, d, add)
	}
	dstSeq := map[string]*Sequence{}
	for _, s := range dst.AllSequences {
		dstSeq[s.String()] = s
	}
	for _, s := range src.Sequences {
		if !s.CanSelect {
			add(s.String(), "the old database's role may not read this sequence: GRANT SELECT ON SEQUENCE %s TO <role>", s.QName())
		}
		d := dstSeq[s.String()]
		if d == nil {
			add(s.String(), "sequence missing in the new database")
			continue
		}
		if !d.CanUpdate {
			add(s.String(), "the new database's role may not set this sequence: GRANT UPDATE ON SEQUENCE %s TO <role>", d.QName())
		}
		if s.Params != d.Params {
			add(s.String(), "defined %s in the old database, %s in the new one: it would hand out other values", s.Params, d.Params)
		}
		if !s.IsOwner {
			add(s.String(), "the old database's role does not own this sequence, which the switch freezes there (ALTER SEQUENCE) so that nothing draws from it after its value is copied: ALTER SEQUENCE %s OWNER TO <role>", s.QName())
		}
	}
	dstMV := map[string]*MatView{}
	for _, m := range dst.MatViews {
		dstMV[m.String()] = m
	}
	for _, m := range src.MatViews {
		d := dstMV[m.String()]
		switch {
		case d == nil:
			add(m.String(), "materialized view missing in the new database (the switchover refreshes it there): create it, or exclude it")
		case !d.IsOwner:
			add(m.String(), "the new database's role does not own this materialized view, which the switchover refreshes: ALTER MATERIALIZED VIEW %s OWNER TO <role>", d.QName())
		}
	}
	return ps
}

func checkColumns(s, d *Table, add func(obj, format string, args ...any)) {
	name := s.String()
	for _, sc := range s.Columns {
		dc, ok := d.Column(sc.Name)
		col := name + "." + sc.Name
		switch {
		case !ok:
			add(col, "column missing in the new database")
		case sc.Type != dc.Type:
			add(col, "type %s in the old database, %s in the new one", sc.Type, dc.Type)
		case sc.TypeDef != dc.TypeDef:
			add(col, "type %s is %s in the old database, %s in the new one", sc.Type, orPlain(sc.TypeDef), orPlain(dc.TypeDef))
		case sc.Collation != dc.Collation:
			add(col, "collation %s in the old database, %s in the new one", collation(sc), collation(dc))
		case sc.Generated != dc.Generated:
			add(col, "generated in one database and not in the other")
		case sc.GenExpr != dc.GenExpr:
			add(col, "generated as %s in the old database, as %s in the new one", sc.GenExpr, dc.GenExpr)
		}
	}
	for _, dc := range d.Columns {
		if _, ok := s.Column(dc.Name); !ok && dc.NotNull && !dc.HasDefault && dc.Identity == 0 && !dc.Generated {
			add(name+"."+dc.Name, "column exists only in the new database, NOT NULL and without a default: rows cannot be written")
		}
	}
}

// subjectToRLS reports whether row level security filters what the
// database's role reads or writes in t (the sync runs with row_security off,
// so it would fail rather than miss rows).
func (d *Database) subjectToRLS(t *Table) bool {
	if !t.RowSecurity || d.Role.Superuser || d.Role.BypassRLS {
		return false
	}
	return !t.IsOwner || t.ForceRowSecurity
}

// checkRelation compares a table's place among its relatives and its row
// level security between the databases.
func checkRelation(s, d *Table, add func(obj, format string, args ...any)) {
	name := s.String()
	if !slices.Equal(s.Parents, d.Parents) || s.Bound != d.Bound {
		add(name, "%s in the old database, %s in the new one: the tables must be related the same way", relation(s), relation(d))
	}
	if s.RowSecurity != d.RowSecurity || s.ForceRowSecurity != d.ForceRowSecurity {
		add(name, "row level security %s in the old database, %s in the new one", rlsState(s), rlsState(d))
	}
	if !slices.Equal(s.Policies, d.Policies) {
		add(name, "policies differ: [%s] in the old database, [%s] in the new one", strings.Join(s.Policies, "; "), strings.Join(d.Policies, "; "))
	}
}

func orPlain(s string) string {
	if s == "" {
		return "(plain)"
	}
	return s
}

func relation(t *Table) string {
	switch {
	case t.Bound != "":
		return fmt.Sprintf("partition of %s (%s)", strings.Join(t.Parents, ", "), t.Bound)
	case len(t.Parents) > 0:
		return "inherits from " + strings.Join(t.Parents, ", ")
	}
	return "no parent"
}

func rlsState(t *Table) string {
	switch {
	case t.ForceRowSecurity && t.RowSecurity:
		return "enabled and forced"
	case t.RowSecurity:
		return "enabled"
	case t.ForceRowSecurity:
		return "forced (not enabled)"
	}
	return "disabled"
}

func collation(c Column) string {
	if c.Collation == "" {
		return "default"
	}
	return c.Collation
}

// CheckReferences lists foreign keys, in the full (unrestricted) database,
// between synced and excluded tables in either direction.
func CheckReferences(full *Database, exclude []string) Problems {
	var ps Problems
	for _, t := range full.Tables {
		tEx := Excluded(exclude, t.Schema, t.Name)
		for _, fk := range t.ForeignKeys() {
			if rEx := Excluded(exclude, fk.Ref.Schema, fk.Ref.Name); tEx && !rEx {
				ps = append(ps, Problem{Object: t.String(), Issue: fmt.Sprintf(
					"excluded, but its foreign key %s references synced table %s: exclude both or neither", fk.Name, fk.RefTable)})
			}
		}
	}
	return ps
}
