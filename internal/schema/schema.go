// Package schema reads the shape of a database (tables, columns, keys,
// constraints, indexes, triggers, sequences) from the system catalogs and
// checks that a target database can receive a source database's data.
//
// Introspection runs with search_path set to pg_catalog only, so that every
// type and object name it renders is schema-qualified and two databases
// render the same type the same way whatever their settings.
//
// Tables are the ordinary tables (and leaf partitions) of every schema but the
// system ones, the library's own, and those owned by extensions. Partitioned
// parents hold no rows and are not synced themselves; temporary tables are
// ignored.
package schema

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Column is one column of a table.
type Column struct {
	Name       string
	Type       string // format_type, schema-qualified except for pg_catalog types
	TypeOID    uint32
	NotNull    bool
	Generated  bool // stored generated column: computed by the database, never written
	Identity   byte // 0, 'a' (ALWAYS) or 'd' (BY DEFAULT)
	HasDefault bool
}

// Constraint is a table constraint other than NOT NULL.
type Constraint struct {
	Name       string
	Kind       byte   // 'p' primary key, 'u' unique, 'f' foreign key, 'x' exclusion, 'c' check
	Def        string // pg_get_constraintdef
	IndexDef   string // primary key and unique: pg_get_indexdef of the backing index
	Deferrable bool
	Deferred   bool
	Inherited  bool // a partition's copy of its parent's constraint: it cannot be dropped alone
	Columns    []string
	RefTable   string // foreign keys: referenced table, qualified
	RefColumns []string
}

// Index is an index that does not back a constraint.
type Index struct {
	Name string
	Def  string // pg_get_indexdef: a complete CREATE INDEX statement
}

// Trigger is a user trigger (not an internal constraint trigger).
type Trigger struct {
	Name    string
	Enabled byte // pg_trigger.tgenabled: 'O' origin, 'D' disabled, 'R' replica, 'A' always
}

// Table is one table.
type Table struct {
	OID          uint32
	Schema       string
	Name         string
	Owner        string
	Columns      []Column
	PrimaryKey   []string // column names in key order; empty if none
	Constraints  []Constraint
	Indexes      []Index
	Triggers     []Trigger
	Partition    bool  // a leaf partition: synced as a table of its own; its indexes belong to the parent's
	RowsEstimate int64 // pg_class.reltuples, -1 if never analysed
	Bytes        int64 // pg_table_size
	Pages        int64 // pg_class.relpages (estimate)

	// Privileges of the current role on the table.
	CanSelect, CanInsert, CanDelete, CanTruncate, CanTrigger, IsOwner bool
}

// QName is the table's quoted, qualified name for SQL.
func (t *Table) QName() string { return pgx.Identifier{t.Schema, t.Name}.Sanitize() }

// String is the table's qualified name for messages.
func (t *Table) String() string { return t.Schema + "." + t.Name }

// Column returns the named column.
func (t *Table) Column(name string) (Column, bool) {
	for _, c := range t.Columns {
		if c.Name == name {
			return c, true
		}
	}
	return Column{}, false
}

// WritableColumns are the columns a copy writes: all but generated ones, in
// name order so that both databases agree whatever their column order.
func (t *Table) WritableColumns() []Column {
	var out []Column
	for _, c := range t.Columns {
		if !c.Generated {
			out = append(out, c)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// ForeignKeys returns the table's foreign keys.
func (t *Table) ForeignKeys() []Constraint {
	var out []Constraint
	for _, c := range t.Constraints {
		if c.Kind == 'f' {
			out = append(out, c)
		}
	}
	return out
}

// Sequence is a sequence.
type Sequence struct {
	Schema, Name string
	OwnedBy      string // "schema.table.column" for serial and identity sequences
	CanUpdate    bool   // UPDATE privilege (setval)
	CanSelect    bool
}

// QName is the sequence's quoted, qualified name.
func (s *Sequence) QName() string { return pgx.Identifier{s.Schema, s.Name}.Sanitize() }

// String is the sequence's qualified name for messages.
func (s *Sequence) String() string { return s.Schema + "." + s.Name }

// Database is the shape of one database.
type Database struct {
	Name      string
	Version   int // server_version_num
	Tables    []*Table
	Sequences []*Sequence
	// PartitionedFKs names foreign keys that involve a partitioned table,
	// which the sync does not support.
	PartitionedFKs []string
	byName         map[string]*Table
}

// Table returns the table with the qualified name schema.name.
func (d *Database) Table(qname string) *Table { return d.byName[qname] }

// TableByOID returns the table with that oid.
func (d *Database) TableByOID(oid uint32) *Table {
	for _, t := range d.Tables {
		if t.OID == oid {
			return t
		}
	}
	return nil
}

// Options select what is read.
type Options struct {
	// LibrarySchema is the library's own schema, never synced.
	LibrarySchema string
}

// Read introspects the database on conn. It runs in its own transaction.
func Read(ctx context.Context, conn *pgx.Conn, opts Options) (*Database, error) {
	var db *Database
	err := pgx.BeginTxFunc(ctx, conn, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		var err error
		db, err = read(ctx, tx, opts)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("read schema: %w", err)
	}
	return db, nil
}

// excludedSchemas is a SQL condition on n.nspname for schemas never synced.
const excludedSchemas = `n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp\_%' AND n.nspname <> $1`

func read(ctx context.Context, tx pgx.Tx, opts Options) (*Database, error) {
	if _, err := tx.Exec(ctx, "SET LOCAL search_path = pg_catalog"); err != nil {
		return nil, err
	}
	db := &Database{byName: map[string]*Table{}}
	if err := tx.QueryRow(ctx, "SELECT current_database(), current_setting('server_version_num')::int").Scan(&db.Name, &db.Version); err != nil {
		return nil, err
	}
	rows, err := tx.Query(ctx, `
SELECT c.oid, n.nspname, c.relname, pg_get_userbyid(c.relowner), c.relispartition, c.reltuples::bigint, pg_table_size(c.oid), c.relpages,
	has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT'), has_table_privilege(c.oid, 'DELETE'),
	has_table_privilege(c.oid, 'TRUNCATE'), has_table_privilege(c.oid, 'TRIGGER'), pg_has_role(c.relowner, 'USAGE')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence <> 't' AND `+excludedSchemas+`
	AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY n.nspname, c.relname`, opts.LibrarySchema)
	if err != nil {
		return nil, err
	}
	byOID := map[uint32]*Table{}
	for rows.Next() {
		t := &Table{}
		if err := rows.Scan(&t.OID, &t.Schema, &t.Name, &t.Owner, &t.Partition, &t.RowsEstimate, &t.Bytes, &t.Pages,
			&t.CanSelect, &t.CanInsert, &t.CanDelete, &t.CanTruncate, &t.CanTrigger, &t.IsOwner); err != nil {
			return nil, err
		}
		db.Tables = append(db.Tables, t)
		db.byName[t.String()] = t
		byOID[t.OID] = t
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	rows, err = tx.Query(ctx, `
SELECT n.nspname || '.' || c.relname || ' (' || con.conname || ')'
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0 AND `+excludedSchemas+`
	AND (c.relkind = 'p' OR (SELECT relkind FROM pg_class WHERE oid = con.confrelid) = 'p')
ORDER BY 1`, opts.LibrarySchema)
	if err != nil {
		return nil, err
	}
	if db.PartitionedFKs, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
		return nil, err
	}
	if len(db.Tables) == 0 {
		return db, readSequences(ctx, tx, db, opts)
	}
	oids := make([]uint32, 0, len(byOID))
	for oid := range byOID {
		oids = append(oids, oid)
	}

	// Columns.
	rows, err = tx.Query(ctx, `
SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid, a.attnotnull,
	a.attgenerated <> '', a.attidentity, a.atthasdef
FROM pg_attribute a
WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum`, oids)
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var oid uint32
		var c Column
		var ident string
		if err := rows.Scan(&oid, &c.Name, &c.Type, &c.TypeOID, &c.NotNull, &c.Generated, &ident, &c.HasDefault); err != nil {
			return nil, err
		}
		if ident != "" {
			c.Identity = ident[0]
		}
		byOID[oid].Columns = append(byOID[oid].Columns, c)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}

	// Constraints (primary, unique, foreign, exclusion, check).
	rows, err = tx.Query(ctx, `
SELECT con.conrelid, con.conname, con.contype, pg_get_constraintdef(con.oid),
	CASE WHEN con.contype IN ('p', 'u') THEN pg_get_indexdef(con.conindid) ELSE '' END, con.condeferrable, con.condeferred,
	con.conparentid <> 0,
	ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
	      JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.i)::text[],
	CASE WHEN con.contype = 'f' THEN (SELECT rn.nspname || '.' || rc.relname FROM pg_class rc JOIN pg_namespace rn ON rn.oid = rc.relnamespace WHERE rc.oid = con.confrelid) END,
	ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
	      JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.i)::text[]
FROM pg_constraint con
WHERE con.conrelid = ANY($1) AND con.contype IN ('p', 'u', 'f', 'x', 'c')
ORDER BY con.conrelid, con.contype, con.conname`, oids)
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var oid uint32
		var c Constraint
		var kind string
		var ref *string
		if err := rows.Scan(&oid, &c.Name, &kind, &c.Def, &c.IndexDef, &c.Deferrable, &c.Deferred, &c.Inherited, &c.Columns, &ref, &c.RefColumns); err != nil {
			return nil, err
		}
		c.Kind = kind[0]
		if ref != nil {
			c.RefTable = *ref
		}
		t := byOID[oid]
		t.Constraints = append(t.Constraints, c)
		if c.Kind == 'p' {
			t.PrimaryKey = c.Columns
		}
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}

	// Indexes that do not back a constraint.
	rows, err = tx.Query(ctx, `
SELECT i.indrelid, ic.relname, pg_get_indexdef(i.indexrelid)
FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE i.indrelid = ANY($1)
	AND NOT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = i.indexrelid AND con.conrelid = i.indrelid)
	AND NOT EXISTS (SELECT 1 FROM pg_inherits inh WHERE inh.inhrelid = i.indexrelid)
ORDER BY i.indrelid, ic.relname`, oids)
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var oid uint32
		var ix Index
		if err := rows.Scan(&oid, &ix.Name, &ix.Def); err != nil {
			return nil, err
		}
		byOID[oid].Indexes = append(byOID[oid].Indexes, ix)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}

	// User triggers.
	rows, err = tx.Query(ctx, `
SELECT tg.tgrelid, tg.tgname, tg.tgenabled
FROM pg_trigger tg
WHERE tg.tgrelid = ANY($1) AND NOT tg.tgisinternal
ORDER BY tg.tgrelid, tg.tgname`, oids)
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var oid uint32
		var tg Trigger
		var en string
		if err := rows.Scan(&oid, &tg.Name, &en); err != nil {
			return nil, err
		}
		tg.Enabled = en[0]
		byOID[oid].Triggers = append(byOID[oid].Triggers, tg)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	return db, readSequences(ctx, tx, db, opts)
}

func readSequences(ctx context.Context, tx pgx.Tx, db *Database, opts Options) error {
	rows, err := tx.Query(ctx, `
SELECT n.nspname, c.relname,
	(SELECT tn.nspname || '.' || tc.relname || '.' || a.attname
	 FROM pg_depend d JOIN pg_class tc ON tc.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = tc.relnamespace
	 JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
	 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i') LIMIT 1),
	has_sequence_privilege(c.oid, 'UPDATE'), has_sequence_privilege(c.oid, 'SELECT')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'S' AND c.relpersistence <> 't' AND `+excludedSchemas+`
	AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY n.nspname, c.relname`, opts.LibrarySchema)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		s := &Sequence{}
		var owned *string
		if err := rows.Scan(&s.Schema, &s.Name, &owned, &s.CanUpdate, &s.CanSelect); err != nil {
			return err
		}
		if owned != nil {
			s.OwnedBy = *owned
		}
		db.Sequences = append(db.Sequences, s)
	}
	return rows.Err()
}

// Select returns the database restricted to the tables not excluded.
// Patterns are "schema.table", where either part may be "*"; a bare name
// means that table in any schema. The library's schema is never included.
func (d *Database) Select(exclude []string) *Database {
	out := &Database{Name: d.Name, Version: d.Version, byName: map[string]*Table{}, Sequences: d.Sequences, PartitionedFKs: d.PartitionedFKs}
	for _, t := range d.Tables {
		if Excluded(exclude, t.Schema, t.Name) {
			continue
		}
		out.Tables = append(out.Tables, t)
		out.byName[t.String()] = t
	}
	return out
}

// Excluded reports whether schema.name matches one of the patterns.
func Excluded(patterns []string, schema, name string) bool {
	for _, p := range patterns {
		ps, pn, ok := strings.Cut(p, ".")
		if !ok {
			ps, pn = "*", p
		}
		if (ps == "*" || ps == schema) && (pn == "*" || pn == name) {
			return true
		}
	}
	return false
}

// Order returns the tables sorted so that referenced tables come before the
// tables that reference them, as far as cycles allow (a cycle's members keep
// name order). Loading in this order lets a target with enforced foreign keys
// accept the rows of an acyclic schema.
func (d *Database) Order() []*Table {
	deps := map[*Table][]*Table{}
	for _, t := range d.Tables {
		for _, fk := range t.ForeignKeys() {
			if ref := d.byName[fk.RefTable]; ref != nil && ref != t {
				deps[t] = append(deps[t], ref)
			}
		}
	}
	var out []*Table
	state := map[*Table]int{} // 1 visiting, 2 done
	var visit func(t *Table)
	visit = func(t *Table) {
		if state[t] != 0 {
			return
		}
		state[t] = 1
		for _, r := range deps[t] {
			if state[r] == 0 {
				visit(r)
			}
		}
		state[t] = 2
		out = append(out, t)
	}
	for _, t := range d.Tables {
		visit(t)
	}
	return out
}

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
// target cannot receive the source's data: missing tables, columns or
// sequences, different types, generated columns or primary keys, tables
// without a primary key, foreign keys between synced and excluded tables, and
// missing privileges. src and dst must be restricted (Select) alike.
func Check(src, dst *Database, exclude []string) Problems {
	var ps Problems
	add := func(obj, format string, args ...any) {
		ps = append(ps, Problem{Object: obj, Issue: fmt.Sprintf(format, args...)})
	}
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
		if !s.CanTrigger && !s.IsOwner {
			add(name, "the old database's role may not create triggers on it (change capture): make the role its owner or GRANT TRIGGER ON %s TO <role>", s.QName())
		}
		for _, fk := range s.ForeignKeys() {
			if rs, rn, _ := strings.Cut(fk.RefTable, "."); Excluded(exclude, rs, rn) {
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
		for _, sc := range s.Columns {
			dc, ok := d.Column(sc.Name)
			col := name + "." + sc.Name
			switch {
			case !ok:
				add(col, "column missing in the new database")
			case sc.Type != dc.Type:
				add(col, "type %s in the old database, %s in the new one", sc.Type, dc.Type)
			case sc.Generated != dc.Generated:
				add(col, "generated in one database and not in the other")
			}
		}
		for _, dc := range d.Columns {
			if _, ok := s.Column(dc.Name); !ok && dc.NotNull && !dc.HasDefault && dc.Identity == 0 && !dc.Generated {
				add(name+"."+dc.Name, "column exists only in the new database, NOT NULL and without a default: rows cannot be written")
			}
		}
		if !slices.Equal(s.PrimaryKey, d.PrimaryKey) {
			add(name, "primary key (%s) in the old database, (%s) in the new one", strings.Join(s.PrimaryKey, ", "), strings.Join(d.PrimaryKey, ", "))
		}
	}
	srcSeq := map[string]*Sequence{}
	for _, s := range src.Sequences {
		srcSeq[s.String()] = s
	}
	dstSeq := map[string]*Sequence{}
	for _, s := range dst.Sequences {
		dstSeq[s.String()] = s
	}
	for _, s := range src.Sequences {
		if owner := s.OwnedBy; owner != "" {
			parts := strings.SplitN(owner, ".", 3)
			if len(parts) == 3 && Excluded(exclude, parts[0], parts[1]) {
				continue
			}
		}
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
	}
	return ps
}

// CheckReferences lists foreign keys, in the full (unrestricted) database,
// between synced and excluded tables in either direction.
func CheckReferences(full *Database, exclude []string) Problems {
	var ps Problems
	for _, t := range full.Tables {
		tEx := Excluded(exclude, t.Schema, t.Name)
		for _, fk := range t.ForeignKeys() {
			rs, rn, _ := strings.Cut(fk.RefTable, ".")
			if rEx := Excluded(exclude, rs, rn); tEx && !rEx {
				ps = append(ps, Problem{Object: t.String(), Issue: fmt.Sprintf(
					"excluded, but its foreign key %s references synced table %s: exclude both or neither", fk.Name, fk.RefTable)})
			}
		}
	}
	return ps
}
