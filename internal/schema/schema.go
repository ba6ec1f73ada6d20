// Package schema reads what a database holds from the system catalogs (its
// tables, their columns, keys, constraints, indexes, triggers, policies and
// relationships; sequences; materialized views; and an inventory of every
// kind of user object), and checks that a target database can receive a
// source database's data.
//
// Introspection runs with search_path set to pg_catalog only, so that every
// type, object name and expression it renders is schema-qualified and two
// databases render the same thing the same way whatever their settings.
//
// Tables are the ordinary tables (leaf partitions, inheritance children and
// unlogged tables included) of every schema but the system ones, the
// library's own, and those created by extensions. Partitioned parents hold
// no rows and are not synced themselves; temporary tables belong to one
// session and are ignored. What happens to every other kind of object is the
// inventory's business (inventory.go): moved, recomputed, refused, or not
// data, each with its reason.
package schema

import (
	"context"
	"fmt"
	"regexp"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"
)

var plainIdent = regexp.MustCompile(`^[a-z_][a-z0-9_$]*$`)

// Name renders schema.name for messages and as the key that identifies a
// relation across the two databases: a part that is not a plain lower-case
// identifier is double-quoted, so that different relations never render
// alike (schema "a.b" table "c" is "a.b".c, schema "a" table "b.c" is
// a."b.c").
func Name(schema, name string) string { return ident(schema) + "." + ident(name) }

func ident(s string) string {
	if plainIdent.MatchString(s) {
		return s
	}
	return pgx.Identifier{s}.Sanitize()
}

// TableRef names a table by its two parts.
type TableRef struct{ Schema, Name string }

func (r TableRef) String() string { return Name(r.Schema, r.Name) }

// Column is one column of a table.
type Column struct {
	Name    string
	Type    string // format_type, schema-qualified except for pg_catalog types
	TypeOID uint32
	// TypeDef renders what the type is made of when its name does not say
	// it all (a domain's base type and typmod, a composite's attributes, a
	// range's subtype, an array's element), for comparison.
	TypeDef    string
	GenExpr    string // a generated column's expression
	Collation  string // the column's collation if it is not its type's default, qualified
	NotNull    bool
	Generated  bool // stored generated column: computed by the database, never written
	Identity   byte // 0, 'a' (ALWAYS) or 'd' (BY DEFAULT)
	HasDefault bool
	// NamesObjects says that the type is, or contains, a reg* type
	// (regclass, regtype, …), whose text form names objects relative to
	// search_path.
	NamesObjects bool
	// TextStable says that the type's text form does not depend on session
	// settings: it is not, and does not contain (through domains, arrays,
	// ranges, composites), a date/time, interval, floating point, bytea,
	// money, geometric or reg* type, nor a base type PostgreSQL does not
	// ship. Change capture renders keys as text in the writer's session;
	// keys of other types need the settings pinned.
	TextStable bool
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
	RefTable   string   // foreign keys: referenced table (see Name)
	Ref        TableRef // foreign keys: referenced table
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
	Unlogged     bool  // its rows are lost at a crash of its server; moved all the same
	RowsEstimate int64 // pg_class.reltuples, or a guess from its size and column widths if never analysed
	Bytes        int64 // pg_table_size
	Pages        int64 // heap pages now (pg_relation_size): relpages is 0 until the first VACUUM or ANALYZE

	// Parents are the tables it inherits from (qualified, in order), or its
	// partitioned parent; Bound is its partition bound.
	Parents []string
	Bound   string
	// RowSecurity and ForceRowSecurity are relrowsecurity and
	// relforcerowsecurity; Policies renders each policy (name, command,
	// roles, expressions) for comparison.
	RowSecurity, ForceRowSecurity bool
	Policies                      []string
	// DeleteRules names the rules that rewrite a DELETE on the table.
	DeleteRules []string

	// Privileges of the current role on the table.
	CanSelect, CanInsert, CanDelete, CanTruncate, CanTrigger, IsOwner bool
}

// QName is the table's quoted, qualified name for SQL.
func (t *Table) QName() string { return pgx.Identifier{t.Schema, t.Name}.Sanitize() }

// String is the table's qualified name for messages and lookups (see Name).
func (t *Table) String() string { return Name(t.Schema, t.Name) }

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

// KeyTextStable reports whether every primary key column's text form is
// independent of session settings (Column.TextStable).
func (t *Table) KeyTextStable() bool {
	for _, name := range t.PrimaryKey {
		if c, ok := t.Column(name); !ok || !c.TextStable {
			return false
		}
	}
	return true
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
	OID          uint32
	Schema, Name string
	// Owner is the table whose column owns it (serial and identity
	// sequences; the table may be a partitioned parent); empty if none.
	Owner TableRef
	// UsedBy lists the tables whose column defaults call it.
	UsedBy []TableRef
	// Params renders the definition that decides the values it hands out
	// (type, start, increment, bounds, cycle), for comparison.
	Params string
	// Increment, and the bounds of its type, decide how the switch freezes
	// it in the old database.
	Increment, TypeMin, TypeMax int64
	CanUpdate                   bool // UPDATE privilege (setval)
	CanSelect                   bool
	IsOwner                     bool // the switch freezes it (ALTER SEQUENCE)
}

// QName is the sequence's quoted, qualified name.
func (s *Sequence) QName() string { return pgx.Identifier{s.Schema, s.Name}.Sanitize() }

// String is the sequence's qualified name for messages and lookups (see Name).
func (s *Sequence) String() string { return Name(s.Schema, s.Name) }

// MatView is a materialized view.
type MatView struct {
	OID          uint32
	Schema, Name string
	Populated    bool
	IsOwner      bool     // the current role may refresh it
	DependsOn    []string // materialized views it reads, directly or through views (see Name)
}

// QName is the materialized view's quoted, qualified name.
func (m *MatView) QName() string { return pgx.Identifier{m.Schema, m.Name}.Sanitize() }

// String is the materialized view's qualified name for messages and lookups (see Name).
func (m *MatView) String() string { return Name(m.Schema, m.Name) }

// Role is what matters of the current role.
type Role struct {
	Name                 string
	Superuser, BypassRLS bool
}

// Database is the shape of one database.
type Database struct {
	Name    string
	Version int // server_version_num
	Role    Role
	// SearchPath is the search_path the role's sessions get (the role's
	// and the database's setting).
	SearchPath string
	Tables     []*Table
	// Partitioned are the partitioned tables (their rows are in Tables).
	Partitioned []*Table
	// Sequences are the sequences a sync moves: after Select, those that no
	// excluded table alone owns or uses. AllSequences are every sequence.
	Sequences, AllSequences []*Sequence
	MatViews                []*MatView
	// PartitionedFKs names foreign keys that involve a partitioned table,
	// which the sync does not support.
	PartitionedFKs []string
	// Inventory lists every kind of user object the database holds.
	Inventory []Found
	// extensionConfigs are the extensions' configuration tables (for
	// RefusedNowSQL).
	extensionConfigs []extensionConfig
	byName           map[string]*Table
}

// Table returns the table with the qualified name schema.name.
func (d *Database) Table(qname string) *Table { return d.byName[qname] }

// MatView returns the materialized view with the qualified name schema.name.
func (d *Database) MatView(qname string) *MatView {
	for _, m := range d.MatViews {
		if m.String() == qname {
			return m
		}
	}
	return nil
}

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
	// Also, if set, runs at the end of the read, in its transaction (and
	// so its snapshot), with the database read.
	Also func(ctx context.Context, tx pgx.Tx, db *Database) error
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
const excludedSchemas = `n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp\_%' AND n.nspname <> $1
	AND NOT ` + isLibrarySchema

// isLibrarySchema is the condition that the schema n is a library schema of
// any namespace (another deployment's, in the same database): the comment
// the library gives its schemas marks them.
const isLibrarySchema = `coalesce(obj_description(n.oid, 'pg_namespace') LIKE 'swo: live switchover state%', false)`

// notExtensionMember is a SQL condition on c.oid: the relation was not
// created by an extension.
const notExtensionMember = `NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')`

// read runs the introspection queries in the caller's transaction.
func read(ctx context.Context, tx pgx.Tx, opts Options) (*Database, error) {
	var searchPath string // the session's own, before it is pinned below
	if err := tx.QueryRow(ctx, "SELECT current_setting('search_path')").Scan(&searchPath); err != nil {
		return nil, err
	}
	// row_security off: a policy must not hide a row from the inventory's
	// probes (it fails them instead, and they count that as rows).
	// jit off: the catalog queries are quick, but their estimates can be
	// high enough that JIT compilation would cost far more than running them.
	if _, err := tx.Exec(ctx, "SET LOCAL search_path = pg_catalog; SET LOCAL row_security = off; SET LOCAL jit = off"); err != nil {
		return nil, err
	}
	db := &Database{byName: map[string]*Table{}, SearchPath: searchPath}
	if err := tx.QueryRow(ctx, `SELECT current_database(), current_setting('server_version_num')::int,
	current_user, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user`).
		Scan(&db.Name, &db.Version, &db.Role.Name, &db.Role.Superuser, &db.Role.BypassRLS); err != nil {
		return nil, err
	}
	rows, err := tx.Query(ctx, `
SELECT c.oid, c.relkind = 'p', n.nspname, c.relname, pg_get_userbyid(c.relowner), c.relispartition, c.relpersistence = 'u',
	CASE WHEN c.reltuples >= 0 OR c.relkind = 'p' THEN c.reltuples::bigint
		ELSE (pg_relation_size(c.oid) / (24 + (SELECT coalesce(sum(CASE WHEN a.attlen > 0 THEN a.attlen ELSE 32 END), 0)
			FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)))::bigint END,
	pg_table_size(c.oid), pg_relation_size(c.oid) / current_setting('block_size')::bigint, c.relrowsecurity, c.relforcerowsecurity,
	ARRAY(SELECT pn.nspname FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
		JOIN pg_namespace pn ON pn.oid = p.relnamespace WHERE i.inhrelid = c.oid ORDER BY i.inhseqno)::text[],
	ARRAY(SELECT p.relname FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent WHERE i.inhrelid = c.oid ORDER BY i.inhseqno)::text[],
	coalesce(pg_get_expr(c.relpartbound, c.oid), ''),
	has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT'), has_table_privilege(c.oid, 'DELETE'),
	has_table_privilege(c.oid, 'TRUNCATE'), has_table_privilege(c.oid, 'TRIGGER'), pg_has_role(c.relowner, 'USAGE')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't' AND `+excludedSchemas+` AND `+notExtensionMember+`
ORDER BY n.nspname, c.relname`, opts.LibrarySchema)
	if err != nil {
		return nil, err
	}
	byOID := map[uint32]*Table{}
	for rows.Next() {
		t := &Table{}
		var parted bool
		var parentSchemas, parentNames []string
		if err := rows.Scan(&t.OID, &parted, &t.Schema, &t.Name, &t.Owner, &t.Partition, &t.Unlogged, &t.RowsEstimate, &t.Bytes, &t.Pages,
			&t.RowSecurity, &t.ForceRowSecurity, &parentSchemas, &parentNames, &t.Bound,
			&t.CanSelect, &t.CanInsert, &t.CanDelete, &t.CanTruncate, &t.CanTrigger, &t.IsOwner); err != nil {
			return nil, err
		}
		for i := range parentSchemas {
			t.Parents = append(t.Parents, Name(parentSchemas[i], parentNames[i]))
		}
		if parted {
			db.Partitioned = append(db.Partitioned, t)
		} else {
			db.Tables = append(db.Tables, t)
			db.byName[t.String()] = t
		}
		byOID[t.OID] = t
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	rows, err = tx.Query(ctx, `
SELECT n.nspname, c.relname, con.conname
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0 AND `+excludedSchemas+`
	AND (c.relkind = 'p' OR (SELECT relkind FROM pg_class WHERE oid = con.confrelid) = 'p')
ORDER BY 1, 2, 3`, opts.LibrarySchema)
	if err != nil {
		return nil, err
	}
	db.PartitionedFKs, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (string, error) {
		var sch, tbl, con string
		err := r.Scan(&sch, &tbl, &con)
		return Name(sch, tbl) + " (" + con + ")", err
	})
	if err != nil {
		return nil, err
	}
	if len(byOID) > 0 {
		if err := readTableDetails(ctx, tx, byOID); err != nil {
			return nil, err
		}
	}
	if err := readSequences(ctx, tx, db, opts); err != nil {
		return nil, err
	}
	if err := readMatViews(ctx, tx, db, opts); err != nil {
		return nil, err
	}
	if db.Inventory, err = inventory(ctx, tx, opts.LibrarySchema); err != nil {
		return nil, fmt.Errorf("inventory: %w", err)
	}
	if db.extensionConfigs, err = extensionConfigTables(ctx, tx); err != nil {
		return nil, err
	}
	if opts.Also != nil {
		db.AllSequences = db.Sequences
		if err := opts.Also(ctx, tx, db); err != nil {
			return nil, err
		}
	}
	db.AllSequences = db.Sequences
	return db, nil
}

// readTableDetails reads columns, constraints, indexes, triggers, policies
// and rules of the tables.
func readTableDetails(ctx context.Context, tx pgx.Tx, byOID map[uint32]*Table) error {
	oids := make([]uint32, 0, len(byOID))
	for oid := range byOID {
		oids = append(oids, oid)
	}
	types, err := readTypes(ctx, tx, oids)
	if err != nil {
		return err
	}
	rows, err := tx.Query(ctx, `
SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid,
	CASE WHEN a.attcollation <> 0 AND a.attcollation <> ty.typcollation
		THEN (SELECT cn.nspname || '.' || co.collname FROM pg_collation co JOIN pg_namespace cn ON cn.oid = co.collnamespace WHERE co.oid = a.attcollation)
		ELSE '' END,
	a.attnotnull, a.attgenerated <> '', a.attidentity, a.atthasdef,
	CASE WHEN a.attgenerated <> '' THEN (SELECT pg_get_expr(ad.adbin, ad.adrelid) FROM pg_attrdef ad WHERE ad.adrelid = a.attrelid AND ad.adnum = a.attnum) ELSE '' END
FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum`, oids)
	if err != nil {
		return err
	}
	for rows.Next() {
		var oid uint32
		var c Column
		var ident string
		if err := rows.Scan(&oid, &c.Name, &c.Type, &c.TypeOID, &c.Collation, &c.NotNull, &c.Generated, &ident, &c.HasDefault, &c.GenExpr); err != nil {
			return err
		}
		if ident != "" {
			c.Identity = ident[0]
		}
		c.TextStable = types.stable(c.TypeOID, 0)
		c.NamesObjects = types.namesObjects(c.TypeOID, 0)
		c.TypeDef = types.def(c.TypeOID, 0)
		byOID[oid].Columns = append(byOID[oid].Columns, c)
	}
	if err := rows.Err(); err != nil {
		return err
	}

	// Constraints (primary, unique, foreign, exclusion, check).
	rows, err = tx.Query(ctx, `
SELECT con.conrelid, con.conname, con.contype, pg_get_constraintdef(con.oid),
	CASE WHEN con.contype IN ('p', 'u') THEN pg_get_indexdef(con.conindid) ELSE '' END, con.condeferrable, con.condeferred,
	con.conparentid <> 0,
	ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
	      JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.i)::text[],
	coalesce((SELECT rn.nspname FROM pg_class rc JOIN pg_namespace rn ON rn.oid = rc.relnamespace WHERE rc.oid = con.confrelid), ''),
	coalesce((SELECT rc.relname FROM pg_class rc WHERE rc.oid = con.confrelid), ''),
	ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
	      JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.i)::text[]
FROM pg_constraint con
WHERE con.conrelid = ANY($1) AND con.contype IN ('p', 'u', 'f', 'x', 'c')
ORDER BY con.conrelid, con.contype, con.conname`, oids)
	if err != nil {
		return err
	}
	for rows.Next() {
		var oid uint32
		var c Constraint
		var kind string
		if err := rows.Scan(&oid, &c.Name, &kind, &c.Def, &c.IndexDef, &c.Deferrable, &c.Deferred, &c.Inherited, &c.Columns,
			&c.Ref.Schema, &c.Ref.Name, &c.RefColumns); err != nil {
			return err
		}
		c.Kind = kind[0]
		if c.Kind == 'f' {
			c.RefTable = c.Ref.String()
		}
		t := byOID[oid]
		t.Constraints = append(t.Constraints, c)
		if c.Kind == 'p' {
			t.PrimaryKey = c.Columns
		}
	}
	if err := rows.Err(); err != nil {
		return err
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
		return err
	}
	for rows.Next() {
		var oid uint32
		var ix Index
		if err := rows.Scan(&oid, &ix.Name, &ix.Def); err != nil {
			return err
		}
		byOID[oid].Indexes = append(byOID[oid].Indexes, ix)
	}
	if err := rows.Err(); err != nil {
		return err
	}

	// User triggers.
	rows, err = tx.Query(ctx, `
SELECT tg.tgrelid, tg.tgname, tg.tgenabled
FROM pg_trigger tg
WHERE tg.tgrelid = ANY($1) AND NOT tg.tgisinternal
ORDER BY tg.tgrelid, tg.tgname`, oids)
	if err != nil {
		return err
	}
	for rows.Next() {
		var oid uint32
		var tg Trigger
		var en string
		if err := rows.Scan(&oid, &tg.Name, &en); err != nil {
			return err
		}
		tg.Enabled = en[0]
		byOID[oid].Triggers = append(byOID[oid].Triggers, tg)
	}
	if err := rows.Err(); err != nil {
		return err
	}

	// Row level security policies, rendered for comparison.
	rows, err = tx.Query(ctx, `
SELECT p.polrelid, p.polname || ': ' || CASE WHEN p.polpermissive THEN 'permissive' ELSE 'restrictive' END || ' for ' ||
	CASE p.polcmd WHEN 'r' THEN 'select' WHEN 'a' THEN 'insert' WHEN 'w' THEN 'update' WHEN 'd' THEN 'delete' ELSE 'all' END ||
	' to ' || coalesce((SELECT string_agg(CASE WHEN r = 0 THEN 'public' ELSE pg_get_userbyid(r)::text END, ', ' ORDER BY 1) FROM unnest(p.polroles) r), '') ||
	coalesce(' using (' || pg_get_expr(p.polqual, p.polrelid) || ')', '') ||
	coalesce(' with check (' || pg_get_expr(p.polwithcheck, p.polrelid) || ')', '')
FROM pg_policy p WHERE p.polrelid = ANY($1) ORDER BY p.polrelid, p.polname`, oids)
	if err != nil {
		return err
	}
	for rows.Next() {
		var oid uint32
		var p string
		if err := rows.Scan(&oid, &p); err != nil {
			return err
		}
		byOID[oid].Policies = append(byOID[oid].Policies, p)
	}
	if err := rows.Err(); err != nil {
		return err
	}

	// Rules that rewrite a DELETE (ev_type 4).
	rows, err = tx.Query(ctx, `SELECT ev_class, rulename FROM pg_rewrite WHERE ev_class = ANY($1) AND ev_type = '4' ORDER BY 1, 2`, oids)
	if err != nil {
		return err
	}
	for rows.Next() {
		var oid uint32
		var name string
		if err := rows.Scan(&oid, &name); err != nil {
			return err
		}
		byOID[oid].DeleteRules = append(byOID[oid].DeleteRules, name)
	}
	return rows.Err()
}

// readSequences reads the sequences that are not extension members (but an
// extension's configuration sequences, whose state is the user's).
func readSequences(ctx context.Context, tx pgx.Tx, db *Database, opts Options) error {
	rows, err := tx.Query(ctx, `
SELECT c.oid, n.nspname, c.relname, coalesce(owner.nspname, ''), coalesce(owner.relname, ''),
	ARRAY(SELECT tn.nspname FROM pg_depend d JOIN pg_attrdef ad ON ad.oid = d.objid JOIN pg_class tc ON tc.oid = ad.adrelid JOIN pg_namespace tn ON tn.oid = tc.relnamespace
	 WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass AND d.refobjid = c.oid ORDER BY tc.oid)::text[],
	ARRAY(SELECT tc.relname FROM pg_depend d JOIN pg_attrdef ad ON ad.oid = d.objid JOIN pg_class tc ON tc.oid = ad.adrelid
	 WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass AND d.refobjid = c.oid ORDER BY tc.oid)::text[],
	format('as %s start %s increment %s minvalue %s maxvalue %s cycle %s', format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcycle),
	s.seqincrement,
	CASE s.seqtypid WHEN 'int2'::regtype THEN -32768 WHEN 'int4'::regtype THEN -2147483648 ELSE -9223372036854775808 END,
	CASE s.seqtypid WHEN 'int2'::regtype THEN 32767 WHEN 'int4'::regtype THEN 2147483647 ELSE 9223372036854775807 END,
	has_sequence_privilege(c.oid, 'UPDATE'), has_sequence_privilege(c.oid, 'SELECT'), pg_has_role(c.relowner, 'USAGE')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_sequence s ON s.seqrelid = c.oid
LEFT JOIN LATERAL (SELECT tn.nspname, tc.relname FROM pg_depend d JOIN pg_class tc ON tc.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = tc.relnamespace
	WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1) owner ON true
WHERE c.relkind = 'S' AND c.relpersistence <> 't' AND `+excludedSchemas+`
	AND (`+notExtensionMember+` OR EXISTS (SELECT 1 FROM pg_extension e WHERE c.oid = ANY(e.extconfig)))
ORDER BY n.nspname, c.relname`, opts.LibrarySchema)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		s := &Sequence{}
		var userSchemas, userNames []string
		if err := rows.Scan(&s.OID, &s.Schema, &s.Name, &s.Owner.Schema, &s.Owner.Name, &userSchemas, &userNames, &s.Params,
			&s.Increment, &s.TypeMin, &s.TypeMax, &s.CanUpdate, &s.CanSelect, &s.IsOwner); err != nil {
			return err
		}
		for i := range userSchemas {
			s.UsedBy = append(s.UsedBy, TableRef{userSchemas[i], userNames[i]})
		}
		db.Sequences = append(db.Sequences, s)
	}
	return rows.Err()
}

// readMatViews reads the materialized views and, for each, the others it
// reads, directly or through (any depth of) views.
func readMatViews(ctx context.Context, tx pgx.Tx, db *Database, opts Options) error {
	rows, err := tx.Query(ctx, `
SELECT c.oid, n.nspname, c.relname, c.relispopulated, pg_has_role(c.relowner, 'USAGE')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'm' AND `+excludedSchemas+` AND `+notExtensionMember+`
ORDER BY n.nspname, c.relname`, opts.LibrarySchema)
	if err != nil {
		return err
	}
	db.MatViews, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (*MatView, error) {
		m := &MatView{}
		return m, r.Scan(&m.OID, &m.Schema, &m.Name, &m.Populated, &m.IsOwner)
	})
	if err != nil || len(db.MatViews) == 0 {
		return err
	}
	// The relations (views and materialized views) each view's or
	// materialized view's query reads.
	rows, err = tx.Query(ctx, `
SELECT r.ev_class, d.refobjid, dc.relkind = 'm'
FROM pg_rewrite r JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid AND d.refclassid = 'pg_class'::regclass
JOIN pg_class dc ON dc.oid = d.refobjid AND dc.relkind IN ('v', 'm') AND dc.oid <> r.ev_class
WHERE r.rulename = '_RETURN'
GROUP BY 1, 2, 3`)
	if err != nil {
		return err
	}
	reads := map[uint32][]uint32{}
	isMat := map[uint32]bool{}
	for rows.Next() {
		var from, to uint32
		var mat bool
		if err := rows.Scan(&from, &to, &mat); err != nil {
			return err
		}
		reads[from] = append(reads[from], to)
		isMat[to] = mat
	}
	if err := rows.Err(); err != nil {
		return err
	}
	byOID := map[uint32]*MatView{}
	for _, m := range db.MatViews {
		byOID[m.OID] = m
	}
	for _, m := range db.MatViews {
		seen := map[uint32]bool{m.OID: true}
		var walk func(oid uint32)
		walk = func(oid uint32) {
			for _, to := range reads[oid] {
				if seen[to] {
					continue
				}
				seen[to] = true
				if isMat[to] {
					if dm := byOID[to]; dm != nil {
						m.DependsOn = append(m.DependsOn, dm.String())
					}
					continue // its own dependencies are its own
				}
				walk(to) // a view: look through it
			}
		}
		walk(m.OID)
		sort.Strings(m.DependsOn)
	}
	return nil
}

// Select returns the database restricted to what a switchover excluding
// those patterns moves: the tables not excluded, the materialized views not
// excluded, and the sequences that some moved table owns or uses, or that
// no table owns or uses. Patterns are "schema.table", where either part may
// be "*"; a bare name means that table in any schema. The library's schema
// is never included.
func (d *Database) Select(exclude []string) *Database {
	out := &Database{Name: d.Name, Version: d.Version, Role: d.Role, SearchPath: d.SearchPath, byName: map[string]*Table{},
		AllSequences: d.AllSequences, PartitionedFKs: d.PartitionedFKs, Inventory: d.Inventory, extensionConfigs: d.extensionConfigs}
	for _, t := range d.Partitioned {
		if !Excluded(exclude, t.Schema, t.Name) {
			out.Partitioned = append(out.Partitioned, t)
		}
	}
	for _, t := range d.Tables {
		if Excluded(exclude, t.Schema, t.Name) {
			continue
		}
		out.Tables = append(out.Tables, t)
		out.byName[t.String()] = t
	}
	for _, s := range d.AllSequences {
		if s.movedWith(exclude) {
			out.Sequences = append(out.Sequences, s)
		}
	}
	for _, m := range d.MatViews {
		if !Excluded(exclude, m.Schema, m.Name) {
			out.MatViews = append(out.MatViews, m)
		}
	}
	return out
}

// movedWith reports whether a switchover excluding those patterns carries
// the sequence over: unless every table that owns it or uses it in a
// default is excluded (the sequence is then theirs, and the new database's
// excluded tables may depend on its own value).
func (s *Sequence) movedWith(exclude []string) bool {
	users := s.UsedBy
	if s.Owner.Name != "" {
		users = append([]TableRef{s.Owner}, users...)
	}
	if len(users) == 0 {
		return true
	}
	for _, u := range users {
		if !Excluded(exclude, u.Schema, u.Name) {
			return true
		}
	}
	return false
}

// Excluded reports whether schema.name matches one of the patterns:
// "schema.table", where either part may be "*" and a part may be
// double-quoted (to name an identifier with a dot or a quote in it); a bare
// name means that table in any schema.
func Excluded(patterns []string, schema, name string) bool {
	for _, p := range patterns {
		ps, pn, anySchema, anyName := splitPattern(p)
		if (anySchema || ps == schema) && (anyName || pn == name) {
			return true
		}
	}
	return false
}

// SplitPattern splits an ExcludeTables pattern into its schema and table
// parts ("*" for a bare table name's schema).
func SplitPattern(p string) (schema, name string) {
	schema, name, _, _ = splitPattern(p)
	return schema, name
}

// splitPattern is SplitPattern that also tells which parts are wildcards:
// an unquoted *, and the schema of a bare name. A quoted "*" names the
// table or schema called *.
func splitPattern(p string) (schema, name string, anySchema, anyName bool) {
	parts, quoted := splitIdents(p)
	if len(parts) == 1 {
		return "*", parts[0], true, parts[0] == "*" && !quoted[0]
	}
	return parts[0], parts[1], parts[0] == "*" && !quoted[0], parts[1] == "*" && !quoted[1]
}

// splitIdents splits a dotted name into its schema and the rest: a part in
// double quotes is taken literally (with "" for a quote), others up to the
// next dot; quoted tells which parts had quotes.
func splitIdents(p string) (parts []string, quoted []bool) {
	var cur strings.Builder
	q := false
	for i := 0; i < len(p); i++ {
		switch {
		case p[i] == '"':
			q = true
			for i++; i < len(p); i++ {
				if p[i] == '"' {
					if i+1 < len(p) && p[i+1] == '"' {
						cur.WriteByte('"')
						i++
						continue
					}
					break
				}
				cur.WriteByte(p[i])
			}
		case p[i] == '.' && len(parts) == 0:
			parts, quoted = append(parts, cur.String()), append(quoted, q)
			cur.Reset()
			q = false
		default:
			cur.WriteByte(p[i])
		}
	}
	return append(parts, cur.String()), append(quoted, q)
}

// Order returns the tables sorted so that referenced tables come before the
// tables that reference them, as far as cycles allow (a cycle's members keep
// name order). Loading in this order lets a target with enforced foreign keys
// accept the rows of an acyclic schema.
func (d *Database) Order() []*Table {
	deps := map[*Table][]*Table{}
	for _, t := range d.Tables {
		for _, fk := range t.ForeignKeys() {
			if ref := d.byName[fk.Ref.String()]; ref != nil && ref != t {
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

// RefreshOrder returns the materialized views so that each comes after the
// ones it reads.
func (d *Database) RefreshOrder() []*MatView {
	byName := map[string]*MatView{}
	for _, m := range d.MatViews {
		byName[m.String()] = m
	}
	var out []*MatView
	seen := map[*MatView]bool{}
	var visit func(m *MatView)
	visit = func(m *MatView) {
		if seen[m] {
			return
		}
		seen[m] = true
		for _, dep := range m.DependsOn {
			if dm := byName[dep]; dm != nil {
				visit(dm)
			}
		}
		out = append(out, m)
	}
	for _, m := range d.MatViews {
		visit(m)
	}
	return out
}
