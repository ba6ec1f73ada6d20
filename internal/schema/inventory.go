package schema

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"
)

// The inventory.
//
// "Nothing silently lost" is a claim about everything a database holds, not
// about the kinds of objects someone thought of. So the inventory does not
// look for known kinds: it walks every system catalog of the database and
// groups every user object it finds (an object whose oid is at or above
// FirstNormalObjectId, 16384: a fresh database has none) by catalog and,
// where the catalog mixes kinds (pg_class, pg_rewrite), by sub-kind. Each
// group is then looked up in Kinds, which says what a switchover does with
// it: moved, recomputed, refused, or not data (schema the new database has
// of its own, or state that is not the database's). A group that is not in
// Kinds — a catalog a newer PostgreSQL added, a relkind nobody has seen —
// makes the preconditions refuse the switch, naming it: an unknown kind
// cannot slip through silently.

// Disposition is what a switchover does with one kind of object.
type Disposition string

// The dispositions.
const (
	Moved      Disposition = "moved"      // copied exactly, and kept in sync until the switch
	Recomputed Disposition = "recomputed" // derived data, computed again in the new database
	Refused    Disposition = "refused"    // the preconditions refuse the switch while the old database holds one
	SchemaOnly Disposition = "schema"     // part of the schema: the new database has its own (run your migrations there)
	NotData    Disposition = "not data"   // holds no data of this database's own
	Library    Disposition = "library"    // swo's own objects
)

// Kind is one kind of object a database can hold, with what a switchover
// does with it and why.
type Kind struct {
	Key         string // catalog, or catalog:sub-kind, as Inventory groups objects
	Name        string
	Disposition Disposition
	Reason      string
}

// Kinds classifies every kind of user object of PostgreSQL's catalogs. The
// README's inventory table is generated from it (a test keeps them equal).
var Kinds = []Kind{
	{"pg_class:r", "table", Moved, "copied from one snapshot, then kept in sync by row triggers; needs a primary key (or exclusion)"},
	{"pg_class:r:unlogged", "unlogged table", Moved, "like a table (its rows are lost at a crash of its server, as before)"},
	{"pg_class:p", "partitioned table", Moved, "holds no rows itself: each partition is moved as a table; partition bounds must be the same in the new database"},
	{"pg_class:S", "sequence", Moved, "last_value and is_called read from the sequence and set inside the pause; its definition must be the same in the new database"},
	{"pg_class:S:unlogged", "unlogged sequence", Moved, "like a sequence"},
	{"pg_class:S:extension-config", "extension configuration sequence", Moved, "like a sequence (pg_dump dumps its state too)"},
	{"pg_class:m", "materialized view", Recomputed, "derived from tables: refreshed in the new database after the copy (left unpopulated if it is unpopulated in the old)"},
	{"pg_class:v", "view", SchemaOnly, "a stored query: holds no rows"},
	{"pg_class:c", "composite type", SchemaOnly, "a type: holds no rows"},
	{"pg_class:i", "index", SchemaOnly, "rebuilt from the new database's own definitions after the bulk load"},
	{"pg_class:I", "partitioned index", SchemaOnly, "rebuilt from the new database's own definitions after the bulk load"},
	{"pg_class:t", "TOAST table", NotData, "out-of-line storage of its table's values: moved with them"},
	{"pg_class:f", "foreign table", NotData, "its rows live on the foreign server, which both databases reach"},
	{"pg_class:temporary", "temporary table, index or sequence", NotData, "belongs to one session and ends with it"},
	{"pg_class:extension", "extension's own table, index or sequence", SchemaOnly, "created by CREATE EXTENSION in the new database (pg_dump does not dump them either)"},
	{"pg_class:extension-config", "extension configuration table holding your rows", Refused, "swo does not move extension tables: copy those rows yourself and list the table in Config.ExcludeTables"},
	{"pg_class:library", "swo's own table", Library, "the library's state in each database"},
	{"pg_class:system-schema", "table in a system schema", Refused, "a superuser's table in pg_catalog or information_schema: move it to a schema of its own"},
	{"pg_inherits", "inheritance and partition relationship", SchemaOnly, "compared: both databases must relate the tables the same way (the sync never touches a child through its parent)"},
	{"pg_policy", "row level security policy", SchemaOnly, "compared: both databases must have the same; the sync reads and writes with row_security off and refuses a role that policies would filter"},
	{"pg_largeobject_metadata", "large object", Refused, "no trigger sees changes to large objects, so they cannot be kept in sync: move their contents into bytea columns, or delete them"},
	{"pg_subscription", "subscription", Refused, "it would keep writing into the old database after the switch: disable and drop it, and create it in the new database after the switch"},
	{"prepared transactions", "prepared transaction", Refused, "holds uncommitted writes and locks that the switch would wait for: COMMIT PREPARED or ROLLBACK PREPARED it"},
	{"replication slots", "logical replication slot", Refused, "its consumer reads the old database's changes and would receive nothing after the switch: move the consumer to a slot in the new database, and drop this one"},
	{"pg_rewrite:view", "view definition", SchemaOnly, "the query of a view or materialized view"},
	{"pg_rewrite:rule", "rule", SchemaOnly, "rules fire on the old database's writes, whose effects are moved; a rule on DELETE of a moved table in the new database is refused (it would rewrite the sync's deletes)"},
	{"pg_trigger", "trigger", SchemaOnly, "the new database's user triggers are disabled while it is loaded and enabled again in the final sync"},
	{"pg_event_trigger", "event trigger", SchemaOnly, "fires on DDL; holds no data"},
	{"pg_constraint", "constraint", SchemaOnly, "the new database's keys and constraints are dropped for the bulk load and restored; foreign keys are validated after the switch"},
	{"pg_attrdef", "column default", SchemaOnly, "the new database's own"},
	{"pg_type", "type", SchemaOnly, "compared through the columns that use it"},
	{"pg_enum", "enum label", SchemaOnly, "the new database's own (a label it lacks fails the copy, loudly)"},
	{"pg_proc", "function, procedure or aggregate", SchemaOnly, "the new database's own"},
	{"pg_namespace", "schema", SchemaOnly, "the new database's own"},
	{"pg_extension", "extension", SchemaOnly, "the new database's own (CREATE EXTENSION); its configuration tables are checked above"},
	{"pg_cast", "cast", SchemaOnly, "the new database's own"},
	{"pg_operator", "operator", SchemaOnly, "the new database's own"},
	{"pg_opclass", "operator class", SchemaOnly, "the new database's own"},
	{"pg_opfamily", "operator family", SchemaOnly, "the new database's own"},
	{"pg_amop", "operator family member", SchemaOnly, "the new database's own"},
	{"pg_amproc", "operator family support function", SchemaOnly, "the new database's own"},
	{"pg_am", "access method", SchemaOnly, "the new database's own"},
	{"pg_collation", "collation", SchemaOnly, "the new database's own; columns must use the same collations (compared)"},
	{"pg_conversion", "encoding conversion", SchemaOnly, "the new database's own"},
	{"pg_language", "procedural language", SchemaOnly, "the new database's own"},
	{"pg_transform", "transform", SchemaOnly, "the new database's own"},
	{"pg_statistic_ext", "extended statistics object", SchemaOnly, "the new database's own; its statistics are computed by ANALYZE"},
	{"pg_ts_config", "text search configuration", SchemaOnly, "the new database's own"},
	{"pg_ts_dict", "text search dictionary", SchemaOnly, "the new database's own"},
	{"pg_ts_parser", "text search parser", SchemaOnly, "the new database's own"},
	{"pg_ts_template", "text search template", SchemaOnly, "the new database's own"},
	{"pg_foreign_data_wrapper", "foreign-data wrapper", SchemaOnly, "the new database's own"},
	{"pg_foreign_server", "foreign server", SchemaOnly, "the new database's own"},
	{"pg_user_mapping", "user mapping", SchemaOnly, "the new database's own"},
	{"pg_default_acl", "default privileges", SchemaOnly, "the new database's own"},
	{"pg_publication", "publication", NotData, "logical replication out of this database: create it in the new database if the subscribers are to follow"},
	{"pg_publication_rel", "publication membership", NotData, "part of a publication"},
	{"pg_publication_namespace", "publication membership", NotData, "part of a publication"},
	{"pg_db_role_setting", "database or role-in-database setting", NotData, "configuration (ALTER DATABASE … SET): configure the new database the same way"},
}

// InventoryTable renders Kinds as a Markdown table for the docs.
func InventoryTable() string {
	var b strings.Builder
	b.WriteString("| object | catalog | what a switchover does | why |\n| --- | --- | --- | --- |\n")
	for _, k := range Kinds {
		fmt.Fprintf(&b, "| %s | `%s` | %s | %s |\n", k.Name, k.Key, k.Disposition, k.Reason)
	}
	return b.String()
}

// satellites are catalogs without their own object identity: their rows
// describe objects of the catalogs above (or statistics, derived from the
// data), and are classified with those.
var satellites = map[string]string{
	"pg_aggregate": "pg_proc", "pg_attribute": "pg_class", "pg_depend": "dependencies", "pg_description": "comments",
	"pg_foreign_table": "pg_class", "pg_index": "pg_class", "pg_inherits": "", "pg_init_privs": "extensions' privileges",
	"pg_largeobject": "pg_largeobject_metadata", "pg_partitioned_table": "pg_class", "pg_range": "pg_type",
	"pg_seclabel": "security labels", "pg_sequence": "pg_class", "pg_statistic": "statistics (ANALYZE)",
	"pg_statistic_ext_data": "statistics (ANALYZE)", "pg_subscription_rel": "pg_subscription", "pg_ts_config_map": "pg_ts_config",
}

// clusterCatalogs are shared catalogs: they hold the cluster's objects
// (roles, databases, tablespaces), which are not part of a database. The
// two that hold per-database rows are read for this database.
var clusterCatalogs = map[string]bool{
	"pg_authid": true, "pg_auth_members": true, "pg_database": true, "pg_tablespace": true, "pg_shdepend": true,
	"pg_shdescription": true, "pg_shseclabel": true, "pg_replication_origin": true, "pg_parameter_acl": true,
	"pg_db_role_setting": false, "pg_subscription": false,
}

// restrictedCatalogs maps catalogs that only superusers may read to a view
// of their object identities that every role may read.
var restrictedCatalogs = map[string]string{
	"pg_user_mapping": "(SELECT umid AS oid FROM pg_catalog.pg_user_mappings) um",
}

// objectNames name the objects of catalogs that pg_describe_object does not know.
var objectNames = map[string]string{
	"pg_enum": "enumtypid::regtype::text || ' ' || quote_literal(enumlabel)",
}

// KindOf returns the classification of an inventory key, or nil.
func KindOf(key string) *Kind {
	for i := range Kinds {
		if Kinds[i].Key == key {
			return &Kinds[i]
		}
	}
	return nil
}

// Found is one kind of object found in a database.
type Found struct {
	Key   string
	Count int      // -1: a catalog that could not be counted (unknown to swo)
	Names []string // the objects, by name: all of them for refused kinds, a few otherwise
	Kind  *Kind    // nil: not classified
	// Tables are the refused extension configuration tables, by their parts.
	Tables []TableRef
}

// inventory walks the catalogs (see above).
func inventory(ctx context.Context, tx pgx.Tx, librarySchema string) ([]Found, error) {
	rows, err := tx.Query(ctx, `SELECT c.relname, c.relisshared, a.attnum IS NOT NULL, a.attnum IS NOT NULL AND has_column_privilege(c.oid, 'oid', 'SELECT')
FROM pg_class c LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'oid' AND a.attnum > 0
WHERE c.relnamespace = 'pg_catalog'::regnamespace AND c.relkind = 'r' ORDER BY 1`)
	if err != nil {
		return nil, err
	}
	type catalog struct {
		name                     string
		shared, hasOID, readable bool
	}
	cats, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (catalog, error) {
		var c catalog
		return c, r.Scan(&c.name, &c.shared, &c.hasOID, &c.readable)
	})
	if err != nil {
		return nil, err
	}
	var found []Found
	// Every (key, name) pair of the catalogs that need more than a count.
	parts := []string{
		`SELECT 'pg_class:' || CASE
			WHEN n.nspname = $1 OR ` + isLibrarySchema + ` THEN 'library'
			WHEN n.nspname IN ('pg_catalog', 'information_schema') AND c.relkind IN ('r', 'p', 'S', 'm') THEN 'system-schema'
			WHEN c.relpersistence = 't' THEN 'temporary'
			WHEN EXISTS (SELECT 1 FROM pg_extension e WHERE c.oid = ANY(e.extconfig)) THEN CASE WHEN c.relkind = 'S' THEN 'S:extension-config' ELSE 'extension-config' END
			WHEN EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') THEN 'extension'
			ELSE c.relkind::text || CASE WHEN c.relpersistence = 'u' AND c.relkind IN ('r', 'S') THEN ':unlogged' ELSE '' END END,
			n.nspname || '.' || c.relname
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid >= 16384`,
		`SELECT 'pg_rewrite:' || CASE WHEN r.rulename = '_RETURN' THEN 'view' ELSE 'rule' END, r.ev_class::regclass::text || ' ' || r.rulename
		FROM pg_rewrite r WHERE r.oid >= 16384`,
		// Large objects get whatever oid their creator asks for: all of them are the user's.
		`SELECT 'pg_largeobject_metadata', oid::text FROM pg_largeobject_metadata`,
		`SELECT 'replication slots', slot_name || ' (plugin ' || coalesce(plugin, '') || ')' FROM pg_replication_slots WHERE database = current_database() AND slot_type = 'logical'`,
		`SELECT 'pg_subscription', subname::text FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())`,
		`SELECT 'pg_db_role_setting', coalesce(pg_get_userbyid(NULLIF(setrole, 0))::text, 'every role') || ': ' || array_to_string(setconfig, ', ')
		FROM pg_db_role_setting WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())`,
		`SELECT 'prepared transactions', gid || ' (owner ' || owner || ', prepared at ' || prepared::text || ')' FROM pg_prepared_xacts WHERE database = current_database()`,
		`SELECT 'pg_inherits', inhrelid::regclass::text || ' of ' || inhparent::regclass::text FROM pg_inherits`,
	}
	detailed := map[string]bool{"pg_class": true, "pg_rewrite": true, "pg_largeobject_metadata": true, "pg_subscription": true,
		"pg_db_role_setting": true, "pg_inherits": true}
	// The other catalogs with object identities: a count and a few names.
	var counted []string
	for _, c := range cats {
		switch {
		case detailed[c.name]:
		case c.shared:
			if _, known := clusterCatalogs[c.name]; !known {
				found = append(found, Found{Key: c.name, Count: -1})
			}
		case !c.hasOID:
			if _, known := satellites[c.name]; !known {
				found = append(found, Found{Key: c.name, Count: -1})
			}
		default:
			from := "pg_catalog." + pgx.Identifier{c.name}.Sanitize()
			if !c.readable {
				// A catalog closed to other roles than superusers, because
				// some of its columns hold secrets: its public view tells.
				view, ok := restrictedCatalogs[c.name]
				if !ok {
					found = append(found, Found{Key: c.name, Count: -1})
					continue
				}
				from = view
			}
			name, ok := objectNames[c.name]
			switch {
			case ok:
			case KindOf(c.name) != nil:
				name = fmt.Sprintf("pg_describe_object(%s::regclass, oid, 0)", quoteLiteral(c.name))
			default: // a catalog swo does not know: its objects may not be describable
				name = "oid::text"
			}
			counted = append(counted, fmt.Sprintf(`SELECT %[1]s, count(*)::int, ARRAY(SELECT %[3]s FROM %[2]s WHERE oid >= 16384 ORDER BY oid LIMIT 5)
			FROM %[2]s WHERE oid >= 16384 HAVING count(*) > 0`, quoteLiteral(c.name), from, name))
		}
	}
	rows, err = tx.Query(ctx, `SELECT k, count(*)::int, array_agg(name ORDER BY name) FROM (`+strings.Join(parts, "\nUNION ALL\n")+`) s(k, name) GROUP BY k`, librarySchema)
	if err != nil {
		return nil, err
	}
	var details []Found
	if details, err = collectFound(rows); err != nil {
		return nil, err
	}
	found = append(found, details...)
	if len(counted) > 0 {
		rows, err = tx.Query(ctx, strings.Join(counted, "\nUNION ALL\n"))
		if err != nil {
			return nil, err
		}
		var counts []Found
		if counts, err = collectFound(rows); err != nil {
			return nil, err
		}
		found = append(found, counts...)
	}
	if found, err = extensionConfigRows(ctx, tx, found); err != nil {
		return nil, err
	}
	for i := range found {
		found[i].Kind = KindOf(found[i].Key)
		if found[i].Kind == nil || found[i].Kind.Disposition != Refused {
			if len(found[i].Names) > 5 {
				found[i].Names = found[i].Names[:5]
			}
		}
	}
	sort.Slice(found, func(i, j int) bool { return found[i].Key < found[j].Key })
	return found, nil
}

func collectFound(rows pgx.Rows) ([]Found, error) {
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Found, error) {
		var f Found
		return f, r.Scan(&f.Key, &f.Count, &f.Names)
	})
}

// extensionConfigRows keeps, under pg_class:extension-config, only the
// configuration tables that hold rows of the user's (those that match the
// extension's own dump condition, as pg_dump dumps them); the others are
// the extension's own. A table whose probe fails (the role may not read it,
// or a policy would hide rows: the session runs with row_security off) is
// taken to hold rows: refused rather than missed.
func extensionConfigRows(ctx context.Context, tx pgx.Tx, found []Found) ([]Found, error) {
	cfgs, err := extensionConfigTables(ctx, tx)
	if err != nil {
		return nil, err
	}
	var withRows []TableRef
	for _, c := range cfgs {
		has := true
		if c.readable {
			sp, err := tx.Begin(ctx) // a savepoint: a failed probe must not end the transaction
			if err != nil {
				return nil, err
			}
			if err := sp.QueryRow(ctx, c.probe()).Scan(&has); err != nil {
				has = true
			}
			if err := sp.Rollback(ctx); err != nil {
				return nil, err
			}
		}
		if has {
			withRows = append(withRows, c.ref)
		}
	}
	out := found[:0]
	var own []string
	for _, f := range found {
		if f.Key != "pg_class:extension-config" {
			out = append(out, f)
			continue
		}
		for _, c := range cfgs {
			if !slices.Contains(withRows, c.ref) {
				own = append(own, c.ref.String())
			}
		}
		if len(withRows) > 0 {
			names := make([]string, len(withRows))
			for i, r := range withRows {
				names[i] = r.String()
			}
			out = append(out, Found{Key: f.Key, Count: len(withRows), Names: names, Tables: withRows})
		}
	}
	if len(own) > 0 {
		merged := false
		for i := range out {
			if out[i].Key == "pg_class:extension" {
				out[i].Count += len(own)
				out[i].Names = append(out[i].Names, own...)
				merged = true
			}
		}
		if !merged {
			out = append(out, Found{Key: "pg_class:extension", Count: len(own), Names: own})
		}
	}
	return out, nil
}

// extensionConfig is an extension's configuration table and the condition
// that selects the rows pg_dump dumps (the user's).
type extensionConfig struct {
	ref       TableRef
	cond, ext string
	readable  bool
}

func (c extensionConfig) probe() string {
	return "SELECT EXISTS (SELECT 1 FROM ONLY " + pgx.Identifier{c.ref.Schema, c.ref.Name}.Sanitize() + " " + c.cond + ")"
}

func extensionConfigTables(ctx context.Context, q interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}) ([]extensionConfig, error) {
	rows, err := q.Query(ctx, `SELECT n.nspname, c.relname, coalesce(e.extcondition[x.i], ''), e.extname::text, has_table_privilege(c.oid, 'SELECT')
FROM pg_extension e CROSS JOIN LATERAL generate_subscripts(e.extconfig, 1) x(i)
JOIN pg_class c ON c.oid = e.extconfig[x.i] JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') ORDER BY 1, 2`)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (extensionConfig, error) {
		var c extensionConfig
		return c, r.Scan(&c.ref.Schema, &c.ref.Name, &c.cond, &c.ext, &c.readable)
	})
}

// RefusedNowSQL selects the names of the refused kinds of objects that the
// database holds now, among those that can appear without DDL on a moved
// table (which the final sync's fingerprint catches): large objects,
// subscriptions, prepared transactions, logical replication slots, and rows
// of the user's in the extensions' configuration tables that were empty when
// the preconditions were checked. The final sync runs it inside the pause:
// a refused object created during the run would otherwise be left behind.
func (d *Database) RefusedNowSQL(exclude []string) string {
	parts := []string{
		`CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_largeobject_metadata) THEN 'large objects' END`,
		`CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_subscription WHERE subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())) THEN 'subscriptions' END`,
		`CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_xacts WHERE database = pg_catalog.current_database()) THEN 'prepared transactions' END`,
		`CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE database = pg_catalog.current_database() AND slot_type = 'logical') THEN 'logical replication slots' END`,
	}
	for _, ref := range d.extensionConfigs {
		if !Excluded(exclude, ref.ref.Schema, ref.ref.Name) {
			parts = append(parts, fmt.Sprintf("CASE WHEN (%s) THEN %s END", ref.probe(), quoteLiteral("rows in "+ref.ref.String())))
		}
	}
	return "SELECT pg_catalog.array_remove(ARRAY[" + strings.Join(parts, ",\n\t") + "]::text[], NULL)"
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// inventoryProblems lists the objects of refused kinds and the objects of
// kinds swo does not know.
func (d *Database) inventoryProblems(exclude []string) Problems {
	var ps Problems
	for _, f := range d.Inventory {
		switch {
		case f.Kind == nil:
			count := fmt.Sprint(f.Count)
			if f.Count < 0 {
				count = "an unknown number of"
			}
			ps = append(ps, Problem{Object: "catalog " + f.Key, Issue: fmt.Sprintf(
				"the old database holds %s object(s) of a kind swo does not know (%s): refused, because they could hold data the switchover would not move; report this to swo's maintainers",
				count, strings.Join(f.Names, ", "))})
		case f.Kind.Disposition != Refused:
		case f.Key == "pg_largeobject_metadata":
			ps = append(ps, Problem{Object: "large objects", Issue: fmt.Sprintf("%d in the old database (oids %s): %s", f.Count, abbreviateList(f.Names, 10), f.Kind.Reason)})
		case f.Key == "pg_class:extension-config":
			for _, t := range f.Tables {
				if !Excluded(exclude, t.Schema, t.Name) {
					ps = append(ps, Problem{Object: t.String(), Issue: "an extension's configuration table holding rows of yours: " + f.Kind.Reason})
				}
			}
		default:
			for _, n := range f.Names {
				ps = append(ps, Problem{Object: f.Kind.Name + " " + n, Issue: f.Kind.Reason})
			}
		}
	}
	return ps
}

// abbreviateList joins names, cut after n of them ("" for none).
func abbreviateList(names []string, n int) string {
	if len(names) <= n {
		return strings.Join(names, ", ")
	}
	return strings.Join(names[:n], ", ") + fmt.Sprintf(", and %d more", len(names)-n)
}
