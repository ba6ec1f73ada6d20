package replicate

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
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
	// In the target, if a table of that name exists there.
	exists                    bool
	targetParent, targetBound string
}

// lockNewPartitions reads the new partitions (oids) in the source, locks
// them against writes until srcTx ends (SHARE: readers go on), and refuses
// one that holds rows: the final sync would switch without them.
func (e *Engine) lockNewPartitions(ctx context.Context, srcTx pgx.Tx, oids []uint32) ([]newPartition, error) {
	if len(oids) == 0 {
		return nil, nil
	}
	rows, err := srcTx.Query(ctx, `SELECT c.oid, pg_catalog.format('%I.%I', n.nspname, c.relname), pg_catalog.format('%I.%I', pn.nspname, p.relname),
	pg_catalog.pg_get_expr(c.relpartbound, c.oid)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_inherits i ON i.inhrelid = c.oid JOIN pg_catalog.pg_class p ON p.oid = i.inhparent
JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
WHERE c.oid = ANY($1) ORDER BY c.oid`, oids)
	if err != nil {
		return nil, fmt.Errorf("final sync: read the partitions created during the run: %w", err)
	}
	parts, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (newPartition, error) {
		var p newPartition
		return p, r.Scan(&p.oid, &p.name, &p.parent, &p.bound)
	})
	if err != nil {
		return nil, fmt.Errorf("final sync: read the partitions created during the run: %w", err)
	}
	if len(parts) != len(oids) {
		return nil, fmt.Errorf("%w: a partition created during the run was dropped or detached again", ErrSchemaChanged)
	}
	names := make([]string, len(parts))
	for i, p := range parts {
		names[i] = p.name
	}
	q := &pgx.Batch{}
	q.Queue("LOCK TABLE ONLY " + strings.Join(names, ", ONLY ") + " IN SHARE MODE")
	var refused []string
	for _, p := range parts {
		q.Queue("SELECT pg_catalog.to_regclass($1)::pg_catalog.oid = $2 AND NOT EXISTS (SELECT 1 FROM ONLY "+p.name+")", p.name, p.oid).
			QueryRow(func(r pgx.Row) error {
				var ok bool
				if err := r.Scan(&ok); err != nil {
					return err
				}
				if !ok {
					refused = append(refused, p.name)
				}
				return nil
			})
	}
	if err := srcTx.SendBatch(ctx, q).Close(); err != nil {
		return nil, fmt.Errorf("final sync: lock the partitions created during the run (%s): %w", strings.Join(names, ", "), err)
	}
	if len(refused) > 0 {
		return nil, fmt.Errorf("%w: partition(s) %s, created during the run, hold rows that capture did not see (only empty new partitions are moved with the switch); RESET, which moves them, and EXECUTE again",
			ErrSchemaChanged, strings.Join(refused, ", "))
	}
	return parts, nil
}

// targetPartitionSQL reads, in the target, the parent and bound of the
// partition named $1, if there is one.
const targetPartitionSQL = `SELECT pg_catalog.format('%I.%I', pn.nspname, p.relname), pg_catalog.pg_get_expr(c.relpartbound, c.oid)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_inherits i ON i.inhrelid = c.oid
JOIN pg_catalog.pg_class p ON p.oid = i.inhparent JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
WHERE c.oid = pg_catalog.to_regclass($1)`

// queueNewPartitions creates, in the target, the new partitions it does
// not have yet (a premaking job may run on both databases: one that exists
// must be the same partition).
func queueNewPartitions(q *pgx.Batch, parts []newPartition) error {
	for _, p := range parts {
		switch {
		case !p.exists:
			q.Queue(fmt.Sprintf("CREATE TABLE %s PARTITION OF %s %s", p.name, p.parent, p.bound))
		case p.targetParent != p.parent || p.targetBound != p.bound:
			return fmt.Errorf("partition %s, created in the old database during the run (%s of %s), is a different partition in the new database (%s of %s): make them the same, then RESET and EXECUTE again",
				p.name, p.bound, p.parent, p.targetBound, p.targetParent)
		}
	}
	return nil
}
