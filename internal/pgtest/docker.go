package pgtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/ory/dockertest/v3"
	"github.com/ory/dockertest/v3/docker"
)

// dockerServer runs the postgres image in a container of its own.
type dockerServer struct {
	s    *Server
	pool *dockertest.Pool
	res  *dockertest.Resource
}

func startDocker(ctx context.Context) (*Server, error) {
	pool, err := dockertest.NewPool("")
	if err != nil {
		return nil, err
	}
	ping := make(chan error, 1)
	go func() { ping <- pool.Client.Ping() }()
	select {
	case err := <-ping:
		if err != nil {
			return nil, fmt.Errorf("no Docker engine answers: %v", err)
		}
	case <-time.After(3 * time.Second):
		return nil, errors.New("no Docker engine answers within 3s")
	}
	image := os.Getenv(EnvImage)
	if image == "" {
		image = "postgres:15"
	}
	repo, tag, _ := strings.Cut(image, ":")
	if tag == "" {
		tag = "latest"
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	password := RandomName("pgtest-secret-")
	res, err := pool.RunWithOptions(&dockertest.RunOptions{
		Repository: repo,
		Tag:        tag,
		Env:        []string{"POSTGRES_PASSWORD=" + password, "POSTGRES_HOST_AUTH_METHOD=scram-sha-256", "POSTGRES_INITDB_ARGS=--auth-host=scram-sha-256"},
		Cmd: []string{"postgres", "-c", "fsync=off", "-c", "full_page_writes=off",
			"-c", "max_connections=500", "-c", "max_locks_per_transaction=256", "-c", "max_wal_size=8GB", "-c", "max_prepared_transactions=10", "-c", "wal_level=logical"},
		PortBindings: map[docker.Port][]docker.PortBinding{
			"5432/tcp": {{HostIP: "127.0.0.1", HostPort: strconv.Itoa(port)}},
		},
	}, func(hc *docker.HostConfig) {
		hc.AutoRemove = false
		hc.RestartPolicy = docker.RestartPolicy{Name: "no"}
	})
	if err != nil {
		return nil, fmt.Errorf("run %s: %w", image, err)
	}
	_ = res.Expire(3600) // a crashed test run must not leave the container forever
	ds := &dockerServer{pool: pool, res: res}
	ds.s = &Server{backend: "docker", host: "127.0.0.1", port: port, user: "postgres",
		password: password, adminDB: "postgres", ctl: ds}
	if err := ds.waitReady(ctx); err != nil {
		_ = pool.Purge(res)
		return nil, err
	}
	return ds.s, nil
}

func (ds *dockerServer) waitReady(ctx context.Context) error {
	rctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	return waitReady(rctx, ds.s, nil)
}

func (ds *dockerServer) stop(ctx context.Context) error {
	return ds.pool.Client.StopContainerWithContext(ds.res.Container.ID, 30, ctx)
}

func (ds *dockerServer) kill(ctx context.Context) error {
	return ds.pool.Client.KillContainer(docker.KillContainerOptions{ID: ds.res.Container.ID, Signal: docker.SIGKILL, Context: ctx})
}

func (ds *dockerServer) start(ctx context.Context) error {
	if err := ds.pool.Client.StartContainerWithContext(ds.res.Container.ID, nil, ctx); err != nil {
		return err
	}
	return ds.waitReady(ctx)
}

func (ds *dockerServer) destroy(context.Context) error { return ds.pool.Purge(ds.res) }
