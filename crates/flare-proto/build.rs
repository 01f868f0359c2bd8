fn main() {
    println!("cargo:rerun-if-changed=proto/worker.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".")
        .compile_protos(&["proto/worker.proto"], &["proto"])
        .expect("compiling proto/worker.proto (needs protoc: apt-get install protobuf-compiler)");
}
