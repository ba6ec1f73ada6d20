// Command demo runs swo end to end on a fresh machine: it starts two
// throwaway PostgreSQL servers through the test harness (local binaries or
// Docker), opens a service's *sql.DB through a switchover-mode connector, and
// shows where its queries go.
//
//	go run ./examples/demo
package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/pgswo/swo"
	"github.com/pgswo/swo/internal/pgtest"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))

	fmt.Println("starting two throwaway PostgreSQL servers…")
	var dbs [2]*pgtest.Database
	for i := range dbs {
		srv, err := pgtest.Start(ctx, true)
		if err != nil {
			return err
		}
		defer srv.Close()
		if dbs[i], err = srv.CreateDatabase(ctx); err != nil {
			return err
		}
		fmt.Printf("  server %d: %s (%s backend)\n", i+1, srv.Addr(), srv.Backend())
	}
	old, next := dbs[0], dbs[1]

	c, err := swo.NewConnector(ctx, swo.Config{OldURL: old.URL, NextURL: next.URL, NodeName: "demo-1", Logger: log})
	if err != nil {
		return err
	}
	db := sql.OpenDB(c)
	defer db.Close()

	if _, err := db.ExecContext(ctx, "CREATE TABLE greeting (id int PRIMARY KEY, msg text)"); err != nil {
		return err
	}
	for i := 1; i <= 3; i++ {
		var where string
		err := db.QueryRowContext(ctx, "INSERT INTO greeting VALUES ($1, 'hello') RETURNING inet_server_port()::text", i).Scan(&where)
		if err != nil {
			return err
		}
		fmt.Printf("write %d went to the server on port %s (the old database)\n", i, where)
	}
	st, _ := json.MarshalIndent(c.Status(), "", "  ")
	fmt.Printf("connector status:\n%s\n", st)
	return nil
}
