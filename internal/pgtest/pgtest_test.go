package pgtest

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

func TestMain(m *testing.M) { Main(m) }

func TestNewDatabaseIsFreshAndFast(t *testing.T) {
	srv := Shared(t)
	start := time.Now()
	const n = 5
	var names []string
	for i := 0; i < n; i++ {
		d := srv.NewDatabase(t)
		names = append(names, d.Name)
		c := Connect(t, d.URL)
		var tables int
		if err := c.QueryRow(context.Background(), "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog','information_schema')").Scan(&tables); err != nil {
			t.Fatal(err)
		}
		if tables != 0 {
			t.Fatalf("database %s is not empty: %d tables", d.Name, tables)
		}
	}
	t.Logf("backend %s: %d databases created and connected in %v (%v each)", srv.Backend(), n, time.Since(start), time.Since(start)/n)
	if names[0] == names[1] {
		t.Fatal("database names repeat")
	}
}

func TestOwnerRoleIsNotSuperuserAndOwnsPublic(t *testing.T) {
	d := NewDatabase(t, Owner("app"))
	c := Connect(t, d.URL)
	var super bool
	if err := c.QueryRow(context.Background(), "SELECT rolsuper FROM pg_roles WHERE rolname = current_user").Scan(&super); err != nil {
		t.Fatal(err)
	}
	if super {
		t.Fatal("owner role is a superuser")
	}
	if _, err := c.Exec(context.Background(), "CREATE TABLE public.t (id int primary key)"); err != nil {
		t.Fatalf("owner cannot create a table in public: %v", err)
	}
	if !strings.Contains(d.URL, d.Password) {
		t.Fatal("URL does not carry the owner's password")
	}
}

func TestOwnServerStopKillRestart(t *testing.T) {
	srv := NewServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d := srv.NewDatabase(t)
	Exec(t, d.URL, "CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1)")

	c, err := pgx.Connect(ctx, d.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	if err := srv.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(ctx); err == nil {
		t.Fatal("connection survived a killed server")
	}
	if _, err := pgx.Connect(ctx, d.URL); err == nil {
		t.Fatal("connected to a killed server")
	}
	if err := srv.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	c2 := Connect(t, d.URL)
	var n int
	if err := c2.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n); err != nil || n != 1 {
		t.Fatalf("after crash recovery: n=%d err=%v", n, err)
	}
	if err := srv.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c2.Ping(ctx); err == nil {
		t.Fatal("connection survived a stopped server")
	}
	if err := srv.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	Exec(t, d.URL, "INSERT INTO t VALUES (2)")
}
