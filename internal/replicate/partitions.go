package replicate

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/pgswo/swo/internal/schema"
)

// newPartition is a partition created in the source during the run, by a
// partition-premaking job, of a moved partitioned table (see
// schema.Shape.NewPartitions). Capture never saw it: the final sync moves it
// only if it is empty, with the source's writers to it locked out until the
// switch commits, after which the seal refuses them.
type newPartition struct {
	oid          uint32
	name, parent string // quoted qualified names
	bound        string // "FOR VALUES …"
	own          []string
	// In the target: the parent's owner, and the partition if a table of
	// that name exists there.
	targetOwner               string
	exists                    bool
	targetParent, targetBound string
}

// newPartitionsSQL reads the partitions ($1: oids) with what each has of its
// own beyond what it inherits from its parent: CREATE TABLE … PARTITION OF
// in the new database gives it only what it inherits.
const newPartitionsSQL = `SELECT c.oid, pg_catalog.format('%I.%I', n.nspname, c.relname), pg_catalog.format('%I.%I', pn.nspname, p.relname),
	pg_catalog.pg_get_expr(c.relpartbound, c.oid),
	pg_catalog.array_remove(ARRAY[
		CASE WHEN c.relpersistence <> p.relpersistence THEN 'persistence' END,
		CASE WHEN c.reloptions IS NOT NULL THEN 'storage options' END,
		CASE WHEN c.reltablespace <> p.reltablespace THEN 'tablespace' END,
		CASE WHEN c.relowner <> p.relowner THEN 'owner' END,
		CASE WHEN c.relacl IS NOT NULL THEN 'grants' END,
		CASE WHEN c.relrowsecurity OR c.relforcerowsecurity THEN 'row level security' END,
		CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_policy x WHERE x.polrelid = c.oid) THEN 'policies' END,
		CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_constraint x WHERE x.conrelid = c.oid AND x.conislocal) THEN 'constraints' END,
		CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_index x WHERE x.indrelid = c.oid
			AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits xi WHERE xi.inhrelid = x.indexrelid)) THEN 'indexes' END,
		CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_trigger x WHERE x.tgrelid = c.oid AND NOT x.tgisinternal
			AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger px WHERE px.tgrelid = p.oid AND px.tgname = x.tgname)) THEN 'triggers' END,
		CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
			LEFT JOIN pg_catalog.pg_attribute pa ON pa.attrelid = p.oid AND pa.attname = a.attname
			LEFT JOIN pg_catalog.pg_attrdef pd ON pd.adrelid = pa.attrelid AND pd.adnum = pa.attnum
			WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
			AND (pg_catalog.pg_get_expr(d.adbin, d.adrelid) IS DISTINCT FROM pg_catalog.pg_get_expr(pd.adbin, pd.adrelid)
				OR a.attnotnull AND NOT pa.attnotnull OR a.attstattarget >= 0 OR a.attoptions IS NOT NULL)) THEN 'columns' END
	], NULL)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_inherits i ON i.inhrelid = c.oid JOIN pg_catalog.pg_class p ON p.oid = i.inhparent
JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
WHERE c.oid = ANY($1) ORDER BY c.oid`

// FindPremade looks, outside the pause, for partitions created during the
// run (see newPartition) and remembers them for the final sync, which locks
// them first. It refuses one that has anything of its own (an index, a
// constraint, a grant, …): the new database would not get it.
func (e *Engine) FindPremade(ctx context.Context, conn *pgx.Conn) error {
	e.premade = nil
	if e.ShapeSQL == "" {
		return nil
	}
	shape, err := schema.ReadShape(ctx, conn, e.ShapeSQL, e.Exclude)
	if err != nil {
		return err
	}
	oids, _ := e.Shape.NewPartitions(shape, e.partitionedOIDs()) // the rest is for the final sync to judge
	if len(oids) == 0 {
		return nil
	}
	rows, err := conn.Query(ctx, newPartitionsSQL, oids)
	if err != nil {
		return fmt.Errorf("read the partitions created during the run: %w", err)
	}
	parts, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (newPartition, error) {
		var p newPartition
		return p, r.Scan(&p.oid, &p.name, &p.parent, &p.bound, &p.own)
	})
	if err != nil {
		return fmt.Errorf("read the partitions created during the run: %w", err)
	}
	var refused []string
	for _, p := range parts {
		if len(p.own) > 0 {
			refused = append(refused, fmt.Sprintf("%s (its own %s)", p.name, strings.Join(p.own, ", ")))
		}
	}
	if len(refused) > 0 {
		return fmt.Errorf("%w: partition(s) created during the run have a definition of their own, which the new database would not get: %s; "+
			"create them in the new database too (or give them only what their parent has), then RESET and EXECUTE again",
			ErrSchemaChanged, strings.Join(refused, "; "))
	}
	e.premade = parts
	return nil
}

// LockedTables names (by oid) the tables the final sync locks besides the
// change table: the moved partitioned tables and the partitions FindPremade
// found.
func (e *Engine) LockedTables() map[uint32]string {
	out := map[uint32]string{}
	for _, p := range e.Source.Partitioned {
		out[p.OID] = p.String()
	}
	for _, p := range e.premade {
		out[p.oid] = p.name
	}
	return out
}

func (e *Engine) partitionedOIDs() map[uint32]bool {
	parents := map[uint32]bool{}
	for _, p := range e.Source.Partitioned {
		parents[p.OID] = true
	}
	return parents
}

// queueLockPremade queues, in the final transaction before the change
// table's lock, the lock of the premade partitions (SHARE: writes wait until
// the switch commits, and then meet the seal). Before the change table's:
// a writer that wrote one of them and then a captured table can finish.
func (e *Engine) queueLockPremade(q *pgx.Batch) {
	if len(e.premade) == 0 {
		return
	}
	names := make([]string, len(e.premade))
	for i, p := range e.premade {
		names[i] = p.name
	}
	q.Queue("LOCK TABLE ONLY " + strings.Join(names, ", ONLY ") + " IN SHARE MODE")
}

// queueLockParents queues the lock of the moved partitioned tables, after
// the change table's: SHARE UPDATE EXCLUSIVE lets rows through but no
// partition be created, attached or detached until the switch commits (one
// created after the shape is read would take rows the switch leaves behind).
func (e *Engine) queueLockParents(q *pgx.Batch) {
	if len(e.Source.Partitioned) == 0 {
		return
	}
	names := make([]string, len(e.Source.Partitioned))
	for i, p := range e.Source.Partitioned {
		names[i] = p.QName()
	}
	q.Queue("LOCK TABLE ONLY " + strings.Join(names, ", ONLY ") + " IN SHARE UPDATE EXCLUSIVE MODE")
}

// queueCheckPremade queues, after the locks, the check that each premade
// partition is still the table found and still empty; failed receives the
// names of those that are not.
func (e *Engine) queueCheckPremade(q *pgx.Batch, failed *[]string) {
	for _, p := range e.premade {
		q.Queue("SELECT pg_catalog.to_regclass($1)::pg_catalog.oid = $2 AND NOT EXISTS (SELECT 1 FROM ONLY "+p.name+")", p.name, p.oid).
			QueryRow(func(r pgx.Row) error {
				var ok bool
				if err := r.Scan(&ok); err != nil {
					return err
				}
				if !ok {
					*failed = append(*failed, p.name)
				}
				return nil
			})
	}
}

// checkPremade compares the new partitions the final sync's shape shows
// (oids) with those locked: one created since FindPremade was not locked.
func (e *Engine) checkPremade(oids []uint32, failed []string) error {
	if len(failed) > 0 {
		return fmt.Errorf("%w: partition(s) %s, created during the run, hold rows that capture did not see (only empty new partitions are moved with the switch) or were renamed; "+
			"create them in the new database too (CREATE TABLE … PARTITION OF …, as the premaking job does), then RESET, which moves them like any table, and EXECUTE again",
			ErrSchemaChanged, strings.Join(failed, ", "))
	}
	locked := map[uint32]bool{}
	for _, p := range e.premade {
		locked[p.oid] = true
	}
	var late []string
	for _, o := range oids {
		if !locked[o] {
			late = append(late, fmt.Sprint(o))
		}
	}
	if len(late) > 0 || len(oids) != len(e.premade) {
		return fmt.Errorf("%w: partitions were created, attached or detached as the pause began (oids %s): RESET and EXECUTE again",
			ErrSchemaChanged, strings.Join(late, ", "))
	}
	return nil
}

// targetPartitionSQL reads, in the target, the parent and bound of the
// partition named $1, if there is one.
const targetPartitionSQL = `SELECT pg_catalog.format('%I.%I', pn.nspname, p.relname), pg_catalog.pg_get_expr(c.relpartbound, c.oid)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_inherits i ON i.inhrelid = c.oid
JOIN pg_catalog.pg_class p ON p.oid = i.inhparent JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
WHERE c.oid = pg_catalog.to_regclass($1)`

// queueReadTarget queues, in the target, the reads queueNewPartitions needs.
func (e *Engine) queueReadTarget(q *pgx.Batch, parts []newPartition) {
	for i := range parts {
		q.Queue(targetPartitionSQL, parts[i].name).Query(func(rows pgx.Rows) error {
			for rows.Next() {
				parts[i].exists = true
				if err := rows.Scan(&parts[i].targetParent, &parts[i].targetBound); err != nil {
					return err
				}
			}
			return rows.Err()
		})
		q.Queue("SELECT pg_catalog.pg_get_userbyid(relowner) FROM pg_catalog.pg_class WHERE oid = pg_catalog.to_regclass($1)", parts[i].parent).
			QueryRow(func(r pgx.Row) error { return r.Scan(&parts[i].targetOwner) })
	}
}

// queueNewPartitions creates, in the target, the new partitions it does
// not have yet, owned by their parent's owner (as in the source). One that
// exists must be the same partition (a premaking job may run on both
// databases). An abort leaves a created partition in place, empty: the
// source has it too, and the next RESET needs it there (it compares the
// schemas; it does not create tables).
func (e *Engine) queueNewPartitions(q *pgx.Batch, parts []newPartition) error {
	for _, p := range parts {
		switch {
		case !p.exists:
			q.Queue(fmt.Sprintf("CREATE TABLE %s PARTITION OF %s %s", p.name, p.parent, p.bound))
			q.Queue(fmt.Sprintf("ALTER TABLE %s OWNER TO %s", p.name, pgx.Identifier{p.targetOwner}.Sanitize()))
		case p.targetParent != p.parent || p.targetBound != p.bound:
			return fmt.Errorf("partition %s, created in the old database during the run (%s of %s), is a different partition in the new database (%s of %s): make them the same, then RESET and EXECUTE again",
				p.name, p.bound, p.parent, p.targetBound, p.targetParent)
		}
	}
	return nil
}
