"""The test PostgreSQL (tests/pgcluster.py): a real server that needs its password."""

import psycopg2
import pytest

from tests.pgcluster import PostgresCluster


def test_cluster_serves_databases_with_password_logins(postgres: PostgresCluster) -> None:
    url = postgres.create_database("pgcluster_check")
    assert url.startswith(f"postgresql://postgres:{postgres.password}@127.0.0.1:{postgres.port}/")
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_database(), inet_server_addr()::text")
            assert cur.fetchone() == ("pgcluster_check", "127.0.0.1/32")
    finally:
        conn.close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host=postgres.host, port=postgres.port, user="postgres", password="wrong")
