-- Demo database "music_festival": singers, festival stages and who performed where.
CREATE TABLE singer (
  singer_id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  country TEXT,
  genre TEXT,
  age INTEGER,
  is_band INTEGER
);
CREATE TABLE stage (
  stage_id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  capacity INTEGER,
  is_indoor INTEGER
);
CREATE TABLE performance (
  performance_id INTEGER PRIMARY KEY,
  singer_id INTEGER NOT NULL,
  stage_id INTEGER NOT NULL,
  festival_year INTEGER,
  day TEXT,
  audience INTEGER,
  FOREIGN KEY (singer_id) REFERENCES singer(singer_id),
  FOREIGN KEY (stage_id) REFERENCES stage(stage_id)
);
INSERT INTO singer VALUES (1, 'Luna Vega', 'Mexico', 'Pop', 27, 0);
INSERT INTO singer VALUES (2, 'The Night Owls', 'England', 'Rock', 34, 1);
INSERT INTO singer VALUES (3, 'Amara Diallo', 'Senegal', 'Jazz', 41, 0);
INSERT INTO singer VALUES (4, 'Kai Lindqvist', 'Sweden', 'Electronic', 30, 0);
INSERT INTO singer VALUES (5, 'Blue Harbor', 'Canada', 'Folk', 38, 1);
INSERT INTO singer VALUES (6, 'Rosa Marquez', 'Spain', 'Pop', 23, 0);
INSERT INTO singer VALUES (7, 'Iron Valley', 'United States', 'Rock', 45, 1);
INSERT INTO singer VALUES (8, 'Mina Cho', 'South Korea', 'Pop', 25, 0);
INSERT INTO singer VALUES (9, 'Samuel Adeyemi', 'Nigeria', 'Jazz', 52, 0);
INSERT INTO singer VALUES (10, 'Polar Drift', 'Sweden', 'Electronic', 29, 1);
INSERT INTO singer VALUES (11, 'Eli Brennan', 'Ireland', 'Folk', 36, 0);
INSERT INTO singer VALUES (12, 'Sofia Russo', 'Italy', 'Classical', 48, 0);
INSERT INTO stage VALUES (1, 'Main Stage', 20000, 0);
INSERT INTO stage VALUES (2, 'Forest Stage', 5000, 0);
INSERT INTO stage VALUES (3, 'Blue Tent', 2500, 1);
INSERT INTO stage VALUES (4, 'Club Hall', 1200, 1);
INSERT INTO stage VALUES (5, 'Lake Stage', 8000, 0);
INSERT INTO performance VALUES (1, 1, 1, 2022, 'Friday', 18500);
INSERT INTO performance VALUES (2, 2, 1, 2022, 'Saturday', 19800);
INSERT INTO performance VALUES (3, 3, 3, 2022, 'Friday', 2100);
INSERT INTO performance VALUES (4, 4, 4, 2022, 'Saturday', 1150);
INSERT INTO performance VALUES (5, 5, 2, 2022, 'Sunday', 4200);
INSERT INTO performance VALUES (6, 7, 1, 2022, 'Sunday', 17600);
INSERT INTO performance VALUES (7, 8, 5, 2022, 'Friday', 7400);
INSERT INTO performance VALUES (8, 1, 5, 2023, 'Saturday', 7900);
INSERT INTO performance VALUES (9, 6, 1, 2023, 'Friday', 16200);
INSERT INTO performance VALUES (10, 2, 2, 2023, 'Saturday', 4800);
INSERT INTO performance VALUES (11, 9, 3, 2023, 'Sunday', 2400);
INSERT INTO performance VALUES (12, 10, 4, 2023, 'Friday', 1100);
INSERT INTO performance VALUES (13, 4, 4, 2023, 'Sunday', 1200);
INSERT INTO performance VALUES (14, 11, 2, 2023, 'Friday', 3900);
INSERT INTO performance VALUES (15, 7, 1, 2023, 'Sunday', 19100);
INSERT INTO performance VALUES (16, 8, 1, 2024, 'Saturday', 19950);
INSERT INTO performance VALUES (17, 3, 3, 2024, 'Saturday', 2300);
INSERT INTO performance VALUES (18, 5, 5, 2024, 'Friday', 6100);
INSERT INTO performance VALUES (19, 1, 1, 2024, 'Sunday', 19400);
INSERT INTO performance VALUES (20, 10, 4, 2024, 'Saturday', 1190);
INSERT INTO performance VALUES (21, 6, 5, 2024, 'Sunday', 7200);
INSERT INTO performance VALUES (22, 2, 1, 2024, 'Friday', 18900);
